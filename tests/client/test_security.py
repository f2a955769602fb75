"""Token auth and TLS / mutual TLS against a real server configured for them."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from client.config import BackoffConfig, ClientConfig, TlsConfig
from client.detector_client import DetectorClient
from client.frames import FrameStatus, SourceFrame
from perception.errors import AuthError, PerceptionError
from tests.client import recordings as R
from tests.client.conftest import start_server

FRAME = SourceFrame("front", 0, 0, encoded=R.jpeg(R.scene(0)))
NO_RETRY = BackoffConfig(initial_s=0.01, max_s=0.02, max_attempts=1)


def test_bearer_token(tiny_manifest: Path) -> None:
    srv, port = start_server(tiny_manifest, auth_tokens=("s3cret",), insecure_token=True)
    addr = f"127.0.0.1:{port}"
    try:
        with DetectorClient(ClientConfig(targets=(addr,), token="s3cret")) as client:
            assert client.detect(FRAME).status is FrameStatus.OK
            got = []
            with client.stream(lambda f, r: got.append(r)) as s:
                s.send(FRAME)
            assert got[0].status is FrameStatus.OK
        with DetectorClient(ClientConfig(targets=(addr,), token="wrong", backoff=NO_RETRY)) as client:
            with pytest.raises(AuthError, match="UNAUTHENTICATED"):
                client.detect(FRAME)
            s = client.stream(lambda f, r: None)
            with pytest.raises(AuthError):
                # The refusal can arrive before send() (which then raises it) or after (close() does).
                s.send(FRAME)
                s.close(timeout=10)
            assert s.reconnects == 0, "a refused token is not retried"
    finally:
        srv.shutdown(0.0)


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make test certificates")
    d = tmp_path_factory.mktemp("pki")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "1", "-subj", "/CN=test-ca", cwd=d)
    sans = (("server", "subjectAltName=DNS:localhost,IP:127.0.0.1"), ("client", "subjectAltName=DNS:camera-front"))
    for name, san in sans:
        _openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=d)
        (d / f"{name}.ext").write_text(san + "\n")
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.pem", "-days", "1", "-extfile", f"{name}.ext", cwd=d)
    yield d


def test_tls_and_mutual_tls(tiny_manifest: Path, pki: Path) -> None:
    srv, port = start_server(tiny_manifest, tls_cert=str(pki / "server.pem"), tls_key=str(pki / "server.key"),
                             tls_client_ca=str(pki / "ca.pem"))
    addr = f"127.0.0.1:{port}"
    try:
        mtls = TlsConfig(ca=pki / "ca.pem", cert=pki / "client.pem", key=pki / "client.key")
        with DetectorClient(ClientConfig(targets=(addr,), tls=mtls)) as client:
            assert client.detect(FRAME).status is FrameStatus.OK
        # Verified by name: the certificate names "localhost", checked instead of the IP.
        named = TlsConfig(ca=pki / "ca.pem", cert=pki / "client.pem", key=pki / "client.key", server_name="localhost")
        with DetectorClient(ClientConfig(targets=(addr,), tls=named)) as client:
            assert client.detect(FRAME).status is FrameStatus.OK
        # Without a client certificate the handshake is refused.
        with DetectorClient(ClientConfig(targets=(addr,), tls=TlsConfig(ca=pki / "ca.pem"), backoff=NO_RETRY,
                                         rpc_timeout_s=3)) as client, pytest.raises(PerceptionError):
            client.detect(FRAME)
        # Plain text to a TLS server fails too.
        with DetectorClient(ClientConfig(targets=(addr,), backoff=NO_RETRY, rpc_timeout_s=3)) as client, \
                pytest.raises(PerceptionError):
            client.detect(FRAME)
    finally:
        srv.shutdown(0.0)
