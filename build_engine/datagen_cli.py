"""``perception gen-data``: a labelled dataset of generated road scenes, or a recorded drive.

  perception gen-data --out DIR --images N --seed S [--width W --height H]
  perception gen-data --drive --out DIR --cameras front,rear --frames F --fps 10 [--seed S]
"""

from __future__ import annotations

import argparse
import json

from perception.cli import add_progress_flag, show_progress


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="perception gen-data",
                                description="Generate labelled road scenes or a recorded drive.")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--seed", type=int, default=0, help="random seed: the same seed writes the same scenes")
    p.add_argument("--width", type=int, default=None, help="image width (default 640; 960 for drives)")
    p.add_argument("--height", type=int, default=None, help="image height (default 360; 540 for drives)")
    p.add_argument("--images", type=int, default=100, help="number of still images")
    p.add_argument("--min-object-px", type=float, default=0.0,
                   help="place objects out to where they are this many pixels tall (default 0: 11-16 px by class)")
    p.add_argument("--drive", action="store_true",
                   help="write a recorded drive (MP4 per camera + drive.mcap + gt.json)")
    p.add_argument("--cameras", default="front,rear", help="comma-separated camera ids (front / rear)")
    p.add_argument("--frames", type=int, default=60, help="frames per camera")
    p.add_argument("--fps", type=float, default=10.0, help="drive frame rate (default 10)")
    p.add_argument("--jpeg-quality", type=int, default=80, help="JPEG quality of the drive's MCAP images (default 80)")
    add_progress_flag(p)
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    from build_engine.config import check_min_object_px
    from perception.errors import ConfigError

    if args.drive:
        from build_engine.data.drive import write_drive

        if args.min_object_px:
            raise ConfigError("--min-object-px is for still images; a drive's objects come and go along the road")

        cams = [c.strip() for c in args.cameras.split(",") if c.strip()]
        if not cams:
            raise ConfigError("--cameras names no camera")
        out = write_drive(args.out, cams, args.frames, args.fps, args.seed, args.width or 960, args.height or 540,
                          args.jpeg_quality)
        print(json.dumps({"drive": str(out), "cameras": cams, "frames": args.frames}))
        return 0
    if args.images <= 0:
        raise ConfigError(f"--images must be positive, got {args.images}")
    from build_engine.data.generate import generate_dataset

    check_min_object_px(args.min_object_px, "--min-object-px")
    out = generate_dataset(args.out, args.images, args.seed, args.width or 640, args.height or 360,
                           progress=show_progress(args.no_progress), min_object_px=args.min_object_px)
    print(json.dumps({"dataset": str(out), "images": args.images}))
    return 0
