"""The peer of bench_triton.py: NVIDIA Triton (through PyTriton) serving our own frame pipeline.

Runs in the peer venv that bench_triton.py makes (Python 3.12, ``nvidia-pytriton``), never in
the project's: PyTriton pins numpy < 2 and tritonclient protobuf < 7. It imports only the
framework-free parts of this repository (``perception.pipeline``, ``server.runtime``): the
same decode, letterbox, onnxruntime session settings and NMS as ``perception serve``, so the
two servers differ only in what is around the pipeline.

The model takes what our KServe front door takes: ``IMAGE``, a BYTES tensor of one encoded
frame per request, and answers ``DETECTIONS`` (FP32 [N, 6]: x1 y1 x2 y2 score class) and
``NUM_DETECTIONS``. Batching is off in the model config: one frame per call,
as a camera's lockstep request is. ``--instances N`` gives the model N instances (PyTriton's list
of inference callables), each running its own requests at once, as Triton's instance groups do.

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
    p.add_argument("--instances", type=int, default=1,
                   help="model instances, each with its own session, running requests at once (default 1)")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)

    import numpy as np
    from pytriton.model_config import ModelConfig, Tensor
    from pytriton.triton import DEFAULT_PROTECTED_ENDPOINTS, Triton, TritonConfig, TritonSecurityConfig

    from perception.manifest import load_manifest
    from perception.pipeline import FrameInput, FramePipeline, RequestOptions
    from server.runtime.factory import RuntimeSettings, backend_for

    manifest = load_manifest(args.manifest)
    options = RequestOptions()

    def instance() -> Any:
        """One model instance: its own pipeline and session (PyTriton runs each on its own thread)."""
        pipe = FramePipeline.from_manifest(manifest)
        backend, _ = backend_for(manifest, "", RuntimeSettings(threads=args.threads, max_batch=1))
        pipe.bind_outputs(backend.outputs)
        backends.append(backend)

        def one(image: Any) -> dict[str, Any]:
            frame = FrameInput("front", 0, 0, encoded=bytes(image[0]))
            (det,) = pipe.run_batch([frame], options, backend.infer)
            rows = np.concatenate([det.boxes, det.scores[:, None], det.class_ids[:, None].astype(np.float32)], axis=1)
            return {"DETECTIONS": rows.astype(np.float32), "NUM_DETECTIONS": np.array([len(det)], np.int32)}

        def infer(requests: list[Any]) -> list[dict[str, Any]]:  # PyTriton: a list of requests, name -> array
            return [one(r["IMAGE"]) for r in requests]

        return infer

    backends: list[Any] = []
    infers = [instance() for _ in range(max(1, args.instances))]

    config = TritonConfig(grpc_address="127.0.0.1", grpc_port=args.grpc_port, http_address="127.0.0.1",
                          http_port=args.http_port, metrics_port=args.metrics_port, log_verbose=0)
    # PyTriton restricts Triton's statistics by default (a token in a header); perf_analyzer reads
    # them for its server-side figures, as it does from a stock tritonserver, where they are open.
    security = TritonSecurityConfig(restricted_endpoints=[e for e in DEFAULT_PROTECTED_ENDPOINTS if e != "statistics"])
    with Triton(config=config, security_config=security) as triton:
        triton.bind(
            model_name=manifest.name,
            infer_func=infers if len(infers) > 1 else infers[0],
            inputs=[Tensor(name="IMAGE", dtype=np.bytes_, shape=(1,))],
            outputs=[Tensor(name="DETECTIONS", dtype=np.float32, shape=(-1, 6)),
                     Tensor(name="NUM_DETECTIONS", dtype=np.int32, shape=(1,))],
            config=ModelConfig(batching=False),
            strict=True,
        )
        print(f"ready grpc=127.0.0.1:{args.grpc_port}", flush=True)
        triton.serve()
    for backend in backends:
        backend.deactivate()
    return 0


if __name__ == "__main__":
    sys.exit(main())
