"""The client of bench_triton.py: stock ``tritonclient`` sending one JPEG per ModelInfer call,
or with ``--stream`` one per request on a ModelStreamInfer stream (Triton's streaming
extension: ``start_stream`` / ``async_stream_infer``), the next sent when the answer arrived.

Runs in the peer venv (tritonclient pins protobuf < 7); drives both KServe v2 servers the same
way, our front door and Triton: one frame in flight, the round trip of each call timed.

    peer/bin/python bench/triton_driver.py --url 127.0.0.1:P --model NAME --frames DIR --n 200 --warmup 20 [--stream]

Prints one JSON object: {"latency_ms": [...], "detections": [...per call...]}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def main() -> int:
    p = argparse.ArgumentParser(prog="triton_driver")
    p.add_argument("--url", required=True, help="HOST:PORT of a KServe v2 gRPC server")
    p.add_argument("--model", required=True, help="model name")
    p.add_argument("--frames", type=Path, required=True, help="directory of *.jpg frames, sent round robin")
    p.add_argument("--n", type=int, default=200, help="timed calls")
    p.add_argument("--warmup", type=int, default=20, help="untimed calls first")
    p.add_argument("--stream", action="store_true", help="on one ModelStreamInfer stream, lockstep")
    args = p.parse_args()

    import queue

    import numpy as np
    import tritonclient.grpc as grpcclient

    frames = [f.read_bytes() for f in sorted(args.frames.glob("*.jpg"))]
    client = grpcclient.InferenceServerClient(args.url)
    outputs = [grpcclient.InferRequestedOutput("DETECTIONS"), grpcclient.InferRequestedOutput("NUM_DETECTIONS")]

    answers: queue.Queue[tuple[object, object]] = queue.Queue()
    if args.stream:
        client.start_stream(callback=lambda result, error: answers.put((result, error)))

    def call(i: int) -> int:
        tensor = grpcclient.InferInput("IMAGE", [1], "BYTES")
        tensor.set_data_from_numpy(np.array([frames[i % len(frames)]], dtype=np.object_))
        if not args.stream:
            result = client.infer(args.model, [tensor], outputs=outputs)
        else:
            client.async_stream_infer(args.model, [tensor], outputs=outputs, request_id=str(i))
            result, error = answers.get(timeout=60)
            if error is not None:
                raise RuntimeError(f"frame {i}: {error}")
        return int(result.as_numpy("DETECTIONS").shape[0])

    for i in range(args.warmup):
        call(i)
    lat, dets = [], []
    for i in range(args.n):
        t0 = time.perf_counter()
        dets.append(call(i))
        lat.append((time.perf_counter() - t0) * 1e3)
    if args.stream:
        client.stop_stream()
    client.close()
    json.dump({"latency_ms": lat, "detections": dets}, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
