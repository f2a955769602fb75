"""``perception sign``: sign an artifact's manifest so devices load only what the build host made."""

from __future__ import annotations

import argparse
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="perception sign",
        description="Write manifest.json.sig (Ed25519) beside a manifest; servers started with "
        "--manifest-public-key refuse an artifact whose signature does not verify.",
    )
    p.add_argument("--model", required=True, type=Path, help="manifest.json (or its directory)")
    p.add_argument("--key", required=True, type=Path,
                   help="Ed25519 private key, PEM (openssl genpkey -algorithm ed25519)")
    return p


def main(argv: list[str]) -> int:
    from server.runtime.signature import sign_manifest

    args = build_parser().parse_args(argv)
    print(sign_manifest(args.model, args.key))
    return 0
