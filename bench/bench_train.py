"""Training-step cost side by side: one optimizer step (load + augment + forward + loss +
backward) of the default detector, for intra-op thread counts and input sizes, measured in one
run and printed as ratios to the first row. Not a test: numbers depend on the machine's load.

  .venv/bin/python -m bench.bench_train [--steps 5] [--batch 16]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np


def step_seconds(threads: int, width: int, height: int, batch: int, steps: int, cache: str) -> float:
    import torch

    from build_engine.config import load_config
    from build_engine.losses import DetectionLoss
    from build_engine.model import build_detector
    from build_engine.train.trainer import load_batch, make_optimizer, prepare_data

    torch.set_num_threads(threads)
    cfg = load_config(None, [f"data.cache_dir={cache}", f"data.train_images={batch * 2}", "data.val_images=2",
                             f"model.input_width={width}", f"model.input_height={height}", f"optim.batch_size={batch}"])
    train, _ = prepare_data(cfg)
    model = build_detector(cfg.model).train()
    opt = make_optimizer(model, cfg)
    crit = DetectionLoss(cfg.loss, cfg.model.num_classes)
    centers, strides = model.anchor_points()
    times = []
    for k in range(steps + 1):
        t = time.perf_counter()
        images, targets = load_batch(train, list(range(batch)), cfg, k)
        loss, _ = crit(model.decode(model(images)), centers, strides, targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t)
    return float(np.median(times[1:]))  # the first step pays one-off allocation


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--batch", type=int, default=16)
    a = p.parse_args()
    rows = [(1, 512, 288), (2, 512, 288), (1, 384, 224), (1, 640, 384)]
    with tempfile.TemporaryDirectory() as cache:
        results = [(r, step_seconds(*r, a.batch, a.steps, cache)) for r in rows]
    base = results[0][1]
    print(f"{'threads':>7} {'input':>9} {'s/step':>8} {'img/s':>7} {'ratio':>6}")
    for (th, w, h), s in results:
        print(f"{th:>7} {w}x{h:<5} {s:>8.3f} {a.batch / s:>7.1f} {s / base:>6.2f}")


if __name__ == "__main__":
    main()
