"""Checks for the deploy targets' secrets: a detector for secret values in files, and a live
check that a server takes TLS and a bearer token the way every shipped config sets it up."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from perception.v1 import detector_pb2 as pb
from perception.v1 import detector_pb2_grpc as pb_grpc

PERCEPTION = str(Path(sys.executable).parent / "perception")
LOOPBACK = ("127.0.0.1", "::1", "localhost")

PRIVATE_KEY = re.compile(r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY-----")
HEX_TOKEN = re.compile(r"(?<![0-9A-Za-z])[0-9a-fA-F]{32,}(?![0-9A-Za-z])")  # e.g. `openssl rand -hex 32`
INLINE_TOKEN = re.compile(
    r"(PERCEPTION_AUTH_TOKENS|PERCEPTION_TOKEN|auth_tokens)[ \t]*[=:][ \t]*[\"'\[]?[ \t]*[\w.~+/-]"
    r"|auth_tokens:[ \t]*\n[ \t]*-[ \t]*\S"
    r"|--(?:auth-)?tokens?[= ][\"']?[\w.~+/-]{8,}|Bearer [\w.~+/-]{8,}"
)


def secrets_in(text: str) -> list[str]:
    """Private keys, hex tokens and inline token settings in ``text`` (the first 60 characters of each)."""
    return [m.group(0)[:60] for pattern in (PRIVATE_KEY, HEX_TOKEN, INLINE_TOKEN) for m in pattern.finditer(text)]


def first_token(secrets: Path) -> str:
    return (secrets / "tokens").read_text().splitlines()[0]


def _health_status(channel: grpc.Channel) -> int:
    check = health_pb2_grpc.HealthStub(channel).Check  # type: ignore[attr-defined]  # stubs omit HealthStub's RPCs
    status: int = check(health_pb2.HealthCheckRequest(), timeout=10).status
    return status


def assert_tls_and_token_required(address: str, secrets: Path, server_name: str = "") -> None:
    """Health over TLS (verified with ``ca.crt``) without a token; the detector only with the
    first token of ``tokens``; nothing at all in plaintext."""
    options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
    creds = grpc.ssl_channel_credentials((secrets / "ca.crt").read_bytes())
    with grpc.secure_channel(address, creds, options=options) as channel:
        assert _health_status(channel) == health_pb2.HealthCheckResponse.SERVING
        stub = pb_grpc.DetectorStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        bearer = [("authorization", f"Bearer {first_token(secrets)}")]
        assert stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=bearer, timeout=10).name
    with grpc.insecure_channel(address) as plain, pytest.raises(grpc.RpcError) as err:
        _health_status(plain)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def relocate(arg: str, mounts: Mapping[str, Path]) -> str:
    """A container path under one of ``mounts`` (container dir -> local dir) made local."""
    for mount_path in sorted(mounts, key=len, reverse=True):
        if arg.startswith(mount_path + "/"):
            return str(mounts[mount_path]) + arg[len(mount_path) :]
    return arg


def run_health(command: list[str], address: str, mounts: Mapping[str, Path]) -> subprocess.CompletedProcess[str]:
    """A target's own `perception health ...` command, its files moved to ``mounts``, aimed at ``address``."""
    argv = [PERCEPTION, *(relocate(a, mounts) for a in command[1:])]
    argv[argv.index("--server") + 1] = address
    return subprocess.run(argv, capture_output=True, text=True, timeout=30)
