"""The least a grpcio server can do for this job: the floor our server is measured against.

A plain grpcio server (the ``perception.v1.Detector`` service's ``Detect`` and ``StreamDetect``
methods, generated messages) whose handlers call the same in-process pipeline (decode,
letterbox, the same onnxruntime backend and session settings, NMS) on the thread gRPC hands
them, and answer boxes, scores and classes. Nothing else: no scheduler, no limits, no
metrics, no interceptors, no stream threads, one frame at a time per call. With ``--aio`` the
same handlers are served on grpc.aio, running the pipeline on the event loop's thread (one
frame at a time in all). It is not a server anyone should run (one bad frame ends its stream,
it has no bounds); it shows what the gRPC round trip costs in Python when the handler does this
job's work, so that ``bench_triton`` and ``bench_server`` can tell our own overhead from
grpcio's.

    .venv/bin/python -m bench.bare_grpc_server --model MANIFEST [--threads N] [--streams N] [--aio]

Prints ``ready grpc=127.0.0.1:P`` on stdout once it serves, then serves until SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

READY_MARK = "ready grpc="


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bare_grpc_server", description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--model", type=Path, required=True, help="manifest.json")
    p.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads (default 1)")
    p.add_argument("--port", type=int, default=0, help="loopback port (default: any free one)")
    p.add_argument("--streams", type=int, default=4,
                   help="calls served at once (gRPC's handler threads; a stream holds one while it lasts)")
    p.add_argument("--aio", action="store_true",
                   help="serve on grpc.aio, the handlers running the pipeline on the event loop's thread")
    args = p.parse_args(argv)

    import grpc

    from perception.manifest import load_manifest
    from perception.pipeline import FrameInput, FramePipeline, RequestOptions
    from perception.v1 import detector_pb2 as pb
    from server.runtime.factory import RuntimeSettings, backend_for

    manifest = load_manifest(args.model)
    pipe = FramePipeline.from_manifest(manifest)
    backend, _ = backend_for(manifest, "", RuntimeSettings(threads=args.threads, max_batch=1))
    pipe.bind_outputs(backend.outputs)
    options = RequestOptions()

    def answer(request: Any) -> Any:
        t0 = time.perf_counter()
        f = request.frame
        (d,) = pipe.run_batch([FrameInput(f.camera_id, f.sequence, f.capture_timestamp_ns, encoded=f.encoded)],
                              options, backend.infer)
        out = pb.DetectResponse(camera_id=f.camera_id, sequence=f.sequence, status=pb.FRAME_STATUS_OK)
        for (x1, y1, x2, y2), score, cls in zip(d.boxes.tolist(), d.scores.tolist(), d.class_ids.tolist(), strict=True):
            out.detections.add(box=pb.Box(x1=x1, y1=y1, x2=x2, y2=y2), score=score, class_id=cls)
        out.timings.total_us = int((time.perf_counter() - t0) * 1e6)
        return out

    def detect(request: Any, _context: Any) -> Any:
        return answer(request)

    def stream(requests: Iterator[Any], _context: Any) -> Iterator[Any]:
        for request in requests:
            yield answer(request)

    parse, serialize = pb.DetectRequest.FromString, pb.DetectResponse.SerializeToString
    if args.aio:
        try:
            asyncio.run(serve_aio(args.port, answer, parse, serialize))
        finally:
            backend.deactivate()
        return 0
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=args.streams))
    server.add_generic_rpc_handlers((service(detect, stream, parse, serialize),))
    port = server.add_insecure_port(f"127.0.0.1:{args.port}")
    server.start()
    print(f"{READY_MARK}127.0.0.1:{port}", flush=True)
    try:
        server.wait_for_termination()
    finally:
        backend.deactivate()
    return 0


def service(detect: Callable[..., Any], stream: Callable[..., Any], parse: Callable[[bytes], Any],
            serialize: Callable[[Any], bytes]) -> Any:
    """The ``perception.v1.Detector`` service with these two handlers (sync or async alike)."""
    import grpc

    return grpc.method_handlers_generic_handler("perception.v1.Detector", {
        "Detect": grpc.unary_unary_rpc_method_handler(detect, request_deserializer=parse,
                                                      response_serializer=serialize),
        "StreamDetect": grpc.stream_stream_rpc_method_handler(stream, request_deserializer=parse,
                                                              response_serializer=serialize),
    })


async def serve_aio(port: int, answer: Callable[[Any], Any], parse: Callable[[bytes], Any],
                    serialize: Callable[[Any], bytes]) -> None:
    """The same two handlers on grpc.aio: one thread reads, runs the pipeline and answers."""
    import grpc

    async def detect(request: Any, _context: Any) -> Any:
        return answer(request)

    async def stream(requests: AsyncIterator[Any], _context: Any) -> AsyncIterator[Any]:
        async for request in requests:
            yield answer(request)

    server = grpc.aio.server()
    server.add_generic_rpc_handlers((service(detect, stream, parse, serialize),))
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print(f"{READY_MARK}127.0.0.1:{bound}", flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    sys.exit(main())
