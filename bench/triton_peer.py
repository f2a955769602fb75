"""The peer of bench_triton.py: NVIDIA Triton (through PyTriton) serving our own frame pipeline.

Runs in the peer venv that bench_triton.py makes (Python 3.12, ``nvidia-pytriton``), never in
the project's: PyTriton pins numpy < 2 and tritonclient protobuf < 7. It imports only the
framework-free parts of this repository (``perception.pipeline``, ``server.runtime``): the
same decode, letterbox, onnxruntime session settings and NMS as ``perception serve``, so the
two servers differ only in what is around the pipeline.

The model takes what our KServe front door takes: ``IMAGE``, a BYTES tensor of one encoded
frame per request, and answers ``DETECTIONS`` (FP32 [N, 6]: x1 y1 x2 y2 score class) and
``NUM_DETECTIONS``. Batching is off in the model config: one frame per call,
as a camera's lockstep request is.

    PYTHONPATH=REPO peer/bin/python bench/triton_peer.py --manifest M --grpc-port P --threads 2

Prints ``ready grpc=127.0.0.1:P`` on stdout when Triton serves, then serves until SIGTERM.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any


def main() -> int:
    p = argparse.ArgumentParser(prog="triton_peer")
    p.add_argument("--manifest", type=Path, required=True, help="manifest.json of the model to serve")
    p.add_argument("--grpc-port", type=int, required=True, help="Triton's gRPC port")
    p.add_argument("--http-port", type=int, required=True, help="Triton's HTTP port (unused, but Triton opens it)")
    p.add_argument("--metrics-port", type=int, required=True, help="Triton's metrics port")
    p.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads (as perception serve)")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)

    import numpy as np
    from pytriton.model_config import ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig

    from perception.manifest import load_manifest
    from perception.pipeline import FrameInput, FramePipeline, RequestOptions
    from server.runtime.factory import RuntimeSettings, backend_for

    manifest = load_manifest(args.manifest)
    pipe = FramePipeline.from_manifest(manifest)
    backend, _ = backend_for(manifest, "", RuntimeSettings(threads=args.threads, max_batch=1))
    pipe.bind_outputs(backend.outputs)
    options = RequestOptions()

    def one(image: Any) -> dict[str, Any]:
        frame = FrameInput("front", 0, 0, encoded=bytes(image[0]))
        (det,) = pipe.run_batch([frame], options, backend.infer)
        rows = np.concatenate([det.boxes, det.scores[:, None], det.class_ids[:, None].astype(np.float32)], axis=1)
        return {"DETECTIONS": rows.astype(np.float32), "NUM_DETECTIONS": np.array([len(det)], np.int32)}

    def infer(requests: list[Any]) -> list[dict[str, Any]]:  # PyTriton: a list of requests, name -> array
        return [one(r["IMAGE"]) for r in requests]

    config = TritonConfig(grpc_address="127.0.0.1", grpc_port=args.grpc_port, http_address="127.0.0.1",
                          http_port=args.http_port, metrics_port=args.metrics_port, log_verbose=0)
    with Triton(config=config) as triton:
        triton.bind(
            model_name=manifest.name,
            infer_func=infer,
            inputs=[Tensor(name="IMAGE", dtype=np.bytes_, shape=(1,))],
            outputs=[Tensor(name="DETECTIONS", dtype=np.float32, shape=(-1, 6)),
                     Tensor(name="NUM_DETECTIONS", dtype=np.int32, shape=(1,))],
            config=ModelConfig(batching=False),
            strict=True,
        )
        print(f"ready grpc=127.0.0.1:{args.grpc_port}", flush=True)
        triton.serve()
    backend.deactivate()
    return 0


if __name__ == "__main__":
    sys.exit(main())
