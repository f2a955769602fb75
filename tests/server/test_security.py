"""Token auth, TLS and mutual TLS on a real server (certificates made with the openssl CLI)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2

from perception.v1 import detector_pb2 as pb
from perception.v1 import detector_pb2_grpc as pb_grpc
from tests.server.conftest import health_check, jpeg, request


def test_token_auth(serve):
    run = serve(auth_tokens=("s3cret-token",), insecure_token=True)
    with pytest.raises(grpc.RpcError) as err:
        run.stub.Detect(request("front", 1, jpeg()), timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED and "Bearer" in (err.value.details() or "")
    with pytest.raises(grpc.RpcError) as err:
        run.stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=[("authorization", "Bearer wrong")], timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as err:
        list(run.stub.StreamDetect(iter([request("front", 1, jpeg())]), timeout=5))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    good = [("authorization", "Bearer s3cret-token")]
    assert run.stub.Detect(request("front", 1, jpeg()), metadata=good, timeout=5).status == pb.FRAME_STATUS_OK
    out = list(run.stub.StreamDetect(iter([request("front", 1, jpeg())]), metadata=good, timeout=5))
    assert out[0].status == pb.FRAME_STATUS_OK
    # Health probes need no token.
    check = health_check(run.channel)
    assert check(health_pb2.HealthCheckRequest(), timeout=5).status == health_pb2.HealthCheckResponse.SERVING


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("openssl") is None:
        pytest.skip("the openssl CLI is not installed")
    d = tmp_path_factory.mktemp("pki")
    (d / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt",
             "-days", "2", "-subj", "/CN=test-ca", cwd=d)
    for name in ("server", "client"):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN={'localhost' if name == 'server' else 'camera-node'}", cwd=d)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.crt", "-days", "2", "-extfile", "san.ext", cwd=d)
    return d


def _secure_stub(port: int, pki: Path, client_cert: bool) -> tuple[grpc.Channel, pb_grpc.DetectorStub]:
    creds = grpc.ssl_channel_credentials(
        (pki / "ca.crt").read_bytes(),
        (pki / "client.key").read_bytes() if client_cert else None,
        (pki / "client.crt").read_bytes() if client_cert else None,
    )
    ch = grpc.secure_channel(f"localhost:{port}", creds)
    return ch, pb_grpc.DetectorStub(ch)


def test_tls(serve, pki):
    run = serve(channel=False, tls_cert=str(pki / "server.crt"), tls_key=str(pki / "server.key"))
    ch, stub = _secure_stub(run.port, pki, client_cert=False)
    try:
        assert stub.Detect(request("front", 1, jpeg()), timeout=10).status == pb.FRAME_STATUS_OK
    finally:
        ch.close()
    plain = grpc.insecure_channel(f"127.0.0.1:{run.port}")
    with pytest.raises(grpc.RpcError) as err:
        pb_grpc.DetectorStub(plain).Detect(request("front", 1, jpeg()), timeout=3)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    plain.close()


def test_mutual_tls(serve, pki):
    run = serve(channel=False, tls_cert=str(pki / "server.crt"), tls_key=str(pki / "server.key"),
                tls_client_ca=str(pki / "ca.crt"))
    ch, stub = _secure_stub(run.port, pki, client_cert=True)
    try:
        assert stub.Detect(request("front", 1, jpeg()), timeout=10).status == pb.FRAME_STATUS_OK
    finally:
        ch.close()
    ch, stub = _secure_stub(run.port, pki, client_cert=False)
    try:
        with pytest.raises(grpc.RpcError) as err:
            stub.Detect(request("front", 1, jpeg()), timeout=3)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        ch.close()
