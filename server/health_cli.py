"""``perception health``: exit 0 iff a server's gRPC health service says SERVING."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="perception health", description="Ask a server whether it is SERVING.")
    p.add_argument("--server", metavar="HOST:PORT", help="address of the server")
    # The flag's name before every command took --server; kept so probes written for it still work.
    p.add_argument("--address", dest="server", help=argparse.SUPPRESS)
    p.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for an answer")
    p.add_argument("--service", default="", help="service name to ask about ('' = the whole server)")
    p.add_argument("--tls-ca", help="CA certificate (PEM) to verify a TLS server")
    p.add_argument("--tls-cert", help="client certificate (PEM) for mutual TLS")
    p.add_argument("--tls-key", help="client private key (PEM) for mutual TLS")
    return p


def main(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.server:
        parser.error("the following arguments are required: --server")
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    if args.tls_ca:
        creds = grpc.ssl_channel_credentials(
            Path(args.tls_ca).read_bytes(),
            Path(args.tls_key).read_bytes() if args.tls_key else None,
            Path(args.tls_cert).read_bytes() if args.tls_cert else None,
        )
        channel = grpc.secure_channel(args.server, creds)
    else:
        channel = grpc.insecure_channel(args.server)
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            check = stub.Check  # type: ignore[attr-defined]  # types-grpcio-health-checking omits HealthStub's RPCs
            resp: health_pb2.HealthCheckResponse = check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout
            )
        except grpc.RpcError as exc:
            print(f"perception health: error: {args.server}: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
    print(f"{args.server}: {status}")
    return 0 if resp.status == health_pb2.HealthCheckResponse.SERVING else 1
