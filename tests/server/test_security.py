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


def test_a_call_without_a_token_is_refused_before_its_request_is_parsed(serve, monkeypatch):
    """The deny handler used to keep the method's request deserializer: gRPC ran it on a
    unary call's request before the UNAUTHENTICATED answer, so a client without a token made
    the server parse whatever it sent (a flooded request: up to seconds of CPU). Counted here
    by wrapping the deserializers the services register (looked up when the server is made)."""
    import server.kserve
    import server.service
    from perception.v1 import grpc_predict_v2_pb2 as kpb

    parsed: list[str] = []

    def counting(name: str, real):
        def parse(data: bytes):
            parsed.append(name)
            return real(data)

        return parse

    monkeypatch.setattr(server.service, "parse_detect_request",
                        counting("detect", server.service.parse_detect_request))
    monkeypatch.setattr(server.kserve, "parse_model_infer_request",
                        counting("infer", server.kserve.parse_model_infer_request))
    run = serve(auth_tokens=("s3cret-token",), insecure_token=True, kserve=True)
    # 100,000 occurrences of the options field, of the parameters field: floods the walk refuses.
    flooded = request("front", 1, jpeg()).SerializeToString() + bytes([2 << 3 | 2, 2, 0x08, 0x01]) * 100_000
    infer = kpb.ModelInferRequest(model_name="tiny").SerializeToString() + bytes([4 << 3 | 2, 0]) * 100_000
    detect, answer = pb.DetectResponse.FromString, kpb.ModelInferResponse.FromString
    unary = [(run.channel.unary_unary("/perception.v1.Detector/Detect", request_serializer=None,
                                      response_deserializer=detect), flooded),
             (run.channel.unary_unary("/inference.GRPCInferenceService/ModelInfer", request_serializer=None,
                                      response_deserializer=answer), infer)]
    streams = [(run.channel.stream_stream("/perception.v1.Detector/StreamDetect", request_serializer=None,
                                          response_deserializer=detect), flooded),
               (run.channel.stream_stream("/inference.GRPCInferenceService/ModelStreamInfer",
                                          request_serializer=None, response_deserializer=answer), infer)]
    for metadata in ([], [("authorization", "Bearer wrong")]):
        for call, data in unary:
            with pytest.raises(grpc.RpcError) as err:
                call(data, metadata=metadata, timeout=10)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, err.value
        for stream, data in streams:
            with pytest.raises(grpc.RpcError) as err:
                list(stream(iter([data, data]), metadata=metadata, timeout=10))
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, err.value
    assert parsed == []
    # With the token the same requests reach the (wrapped) deserializers, and are refused there.
    for call, data in unary:
        with pytest.raises(grpc.RpcError) as err:
            call(data, metadata=[("authorization", "Bearer s3cret-token")], timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value
    assert parsed == ["detect", "infer"]


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


def test_a_call_without_a_token_is_refused_before_its_request_arrives(serve):
    """The refusal was a unary handler: gRPC waits for the request message before running it, so
    a call that sent its headers and never a message held a handler thread until the connection
    aged out (48 of them made health checks time out). Refused now as soon as the call starts."""
    import threading
    import time

    run = serve(auth_tokens=("s3cret-token",), insecure_token=True)
    never = threading.Event()

    def no_message():  # headers go out; the message never does
        never.wait(30)
        return
        yield

    calls = []
    for method in ("/perception.v1.Detector/GetModelInfo", "/perception.v1.Detector/Detect"):
        open_call = run.channel.stream_unary(method, request_serializer=lambda b: b,
                                             response_deserializer=lambda b: b)
        calls += [open_call.future(no_message(), timeout=20) for _ in range(64)]
    t0 = time.monotonic()
    try:
        for call in calls:
            assert call.exception(timeout=10).code() == grpc.StatusCode.UNAUTHENTICATED
        assert time.monotonic() - t0 < 5.0
        check = health_check(run.channel)
        assert check(health_pb2.HealthCheckRequest(), timeout=2).status == health_pb2.HealthCheckResponse.SERVING
    finally:
        never.set()


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
