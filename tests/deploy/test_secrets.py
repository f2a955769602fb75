"""TLS and bearer tokens loaded from secrets, never committed: deploy/README.md's commands
make a CA, a server certificate and key and a token (run as they stand, in a tmp dir) that the
real server accepts; nothing secret is in deploy/ and every place the README puts secrets is
git-ignored; the vehicle's unit and the compose file take the certificate, key and token file
from their secret stores (systemd credentials, compose secrets) where the README puts them, and
their own server command and health check run for real with them. Kubernetes: test_secrets_k8s.py.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest
import yaml

from tests.deploy.cli_check import REPO_ROOT, module_written, parse_perception_argv, serve_settings
from tests.deploy.dockerfile import healthcheck_exec, parse_dockerfile
from tests.deploy.live_server import serve
from tests.deploy.secret_checks import (
    LOOPBACK,
    PERCEPTION,
    assert_tls_and_token_required,
    first_token,
    relocate,
    run_health,
    secrets_in,
)
from tests.deploy.secret_setup import (
    CREATED_IN,
    commands,
    create_secrets,
    creation_block,
    indented_blocks,
    placed_at,
    placements,
    secrets_section,
)
from tests.deploy.test_compose import server_argv, server_env
from tests.deploy.test_vehicle import NotifySocket, parse_env_file, parse_unit

VEHICLE = REPO_ROOT / "deploy" / "vehicle"
UNIT = VEHICLE / "perception.service"
K8S = REPO_ROOT / "deploy" / "k8s"
COMPOSE = REPO_ROOT / "deploy" / "compose" / "compose.yaml"


# --- the README's secrets, made for real -------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """deploy/README.md's creation block, run as it stands in an empty directory."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl CLI is not installed")
    return create_secrets(tmp_path_factory.mktemp("ca-machine"))


def test_readme_creates_a_ca_a_server_certificate_and_a_token(pki: Path) -> None:
    assert {"ca.crt", "ca.key", "tls.crt", "tls.key", "tokens"} <= {p.name for p in pki.iterdir()}
    verify = subprocess.run(["openssl", "verify", "-CAfile", str(pki / "ca.crt"), str(pki / "tls.crt")],
                            capture_output=True, text=True, timeout=30)
    assert verify.returncode == 0, verify.stderr
    san = subprocess.run(["openssl", "x509", "-in", str(pki / "tls.crt"), "-noout", "-ext", "subjectAltName"],
                         capture_output=True, text=True, timeout=30, check=True).stdout
    service = next(d for d in yaml.safe_load_all((K8S / "service.yaml").read_text()) if d)["metadata"]
    for name in ("IP Address:127.0.0.1", "DNS:localhost",
                 f"DNS:{service['name']}.{service['namespace']}.svc.cluster.local"):
        assert name in san, f"the server certificate does not name {name}: {san}"
    assert re.fullmatch(r"[0-9a-f]{64}\n", (pki / "tokens").read_text()), "one token, 32 random bytes in hex"
    for private in ("ca.key", "tls.key", "tokens"):
        assert stat.S_IMODE((pki / private).stat().st_mode) & 0o077 == 0, f"{private} is readable by others"


def test_server_accepts_the_readme_secrets(pki: Path, tiny_manifest: Path) -> None:
    from server.app import create_server
    from server.config import ServerConfig

    config = ServerConfig(model=str(tiny_manifest), host="127.0.0.1", port=0, threads=1, warmup_iters=1,
                          tls_cert=str(pki / "tls.crt"), tls_key=str(pki / "tls.key"), auth_tokens=(first_token(pki),))
    server, port = create_server(config)
    address = f"127.0.0.1:{port}"
    try:
        assert_tls_and_token_required(address, pki)
        # What in-cluster clients dial: the headless Service's name, checked against the certificate.
        assert_tls_and_token_required(address, pki, "perception.perception.svc.cluster.local")
        # The vehicle's watchdog check: TLS verified against the CA, for the name it is given.
        health_serving = _load_supervisor().health_serving
        ca = (pki / "ca.crt").read_bytes()
        assert health_serving(address, 5.0, ca) and health_serving(address, 5.0, ca, "localhost")
        assert not health_serving(address, 5.0, ca, "not-in-the-certificate.example")
        assert not health_serving(address, 5.0), "plaintext health against the TLS server"
    finally:
        server.shutdown(1.0)


# --- nothing secret in the repository ----------------------------------------------------------

def _git(*args: str) -> subprocess.CompletedProcess[str]:
    if shutil.which("git") is None or not (REPO_ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    return subprocess.run(["git", "-C", str(REPO_ROOT), *args], capture_output=True, text=True, timeout=60)


def test_the_secret_detector_finds_what_the_readme_makes(pki: Path) -> None:
    assert secrets_in((pki / "tls.key").read_text()) and secrets_in((pki / "ca.key").read_text())
    assert secrets_in((pki / "tokens").read_text())
    for inline in (f"PERCEPTION_AUTH_TOKENS={first_token(pki)}", "  auth_tokens: [abc]", "auth_tokens:\n  - abc",
                   "--token s3cret-token", "PERCEPTION_TOKEN: 'xyz'"):
        assert secrets_in(inline), inline
    assert not secrets_in('PERCEPTION_TOKEN="$(head -n 1 /secrets/tokens/tokens)" Bearer <token>')
    assert not secrets_in("secrets:\n  auth_tokens:\n    file: ./secrets/tokens\n")


def test_no_private_key_or_token_is_committed_under_deploy() -> None:
    """Tracked files, and untracked ones git would add: ignored secret files are left out."""
    listed = _git("ls-files", "-z", "--cached", "--others", "--exclude-standard", "--", "deploy")
    assert listed.returncode == 0, listed.stderr
    files = [REPO_ROOT / name for name in listed.stdout.split("\0") if name]
    assert len(files) > 10
    found = {}
    for path in files:
        if path.is_file() and (hits := secrets_in(path.read_text(errors="replace"))):
            found[str(path.relative_to(REPO_ROOT))] = hits
    assert not found, f"secrets in the repository: {found}"


def test_every_place_secrets_are_made_or_copied_to_is_git_ignored(pki: Path) -> None:
    made = [f"{CREATED_IN}/{p.name}" for p in pki.iterdir()]
    copied = [p.dest for p in placements() if not p.dest.startswith("/")]
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    generated = [str((K8S / f.split("=", 1)[-1]).relative_to(REPO_ROOT))
                 for g in kustomization["secretGenerator"] for f in g["files"]]
    compose = yaml.safe_load(COMPOSE.read_text())
    mounted = [str((COMPOSE.parent / s["file"]).resolve().relative_to(REPO_ROOT)) for s in compose["secrets"].values()]
    paths = sorted(set(made + copied + generated + mounted))
    assert len(paths) >= 12
    result = _git("check-ignore", "--no-index", *paths)
    ignored = set(result.stdout.split())
    assert ignored == set(paths), f"not git-ignored: {sorted(set(paths) - ignored)}"


# --- vehicle: systemd credentials ----------------------------------------------------------------


def _load_supervisor() -> ModuleType:
    spec = importlib.util.spec_from_file_location("sd_supervise", VEHICLE / "sd_supervise.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def unit_credentials(unit: dict[str, dict[str, list[str]]]) -> dict[str, str]:
    """ID -> source path of every LoadCredential= / LoadCredentialEncrypted=."""
    values = unit["Service"].get("LoadCredential", []) + unit["Service"].get("LoadCredentialEncrypted", [])
    return dict(v.split(":", 1) for v in values)


def unit_environment(unit: dict[str, dict[str, list[str]]]) -> dict[str, str]:
    return dict(a.split("=", 1) for v in unit["Service"].get("Environment", []) for a in shlex.split(v))


def unit_serve_args(unit: dict[str, dict[str, list[str]]]) -> argparse.Namespace:
    """The server command of the unit's ExecStart (after the supervisor's ``--``), parsed; the
    settings it takes from the environment file filled in, ${CREDENTIALS_DIRECTORY} left as is."""
    settings = parse_env_file(VEHICLE / "perception.env")
    argv = [re.sub(r"\$\{(PERCEPTION_\w+)\}", lambda m: settings[m.group(1)], a)
            for a in shlex.split(unit["Service"]["ExecStart"][0])]
    return parse_perception_argv(["perception", *argv[argv.index("--") + 2 :]])


def credential_id(value: str, prefix: str) -> str:
    assert value.startswith(prefix) and "/" not in value[len(prefix):], f"{value} is not a credential ({prefix}ID)"
    return value[len(prefix):]


def test_unit_loads_tls_and_tokens_as_credentials_placed_by_the_readme() -> None:
    unit = parse_unit(UNIT.read_text())
    creds = unit_credentials(unit)
    env = unit_environment(unit)
    env_file = parse_env_file(VEHICLE / "perception.env")
    # The server command names each credential through ${CREDENTIALS_DIRECTORY} (systemd >= 247),
    # never the %d specifier, newer than the credentials themselves.
    serve = unit_serve_args(unit)
    cert_id = credential_id(serve.tls_cert, "${CREDENTIALS_DIRECTORY}/")
    key_id = credential_id(serve.tls_key, "${CREDENTIALS_DIRECTORY}/")
    assert {cert_id, key_id} <= set(creds)
    argv = shlex.split(unit["Service"]["ExecStart"][0])
    supervisor = _load_supervisor().build_parser().parse_args(argv[2 : argv.index("--")])
    tokens_id = credential_id(serve.auth_token_file, "${CREDENTIALS_DIRECTORY}/")
    ca_id = credential_id(supervisor.tls_ca, "${CREDENTIALS_DIRECTORY}/")
    assert {tokens_id, ca_id} <= set(creds), "the token file and the watchdog's CA are credentials"
    assert not any("%d" in v for v in env.values()), "%d is unknown to older systemds with credentials"
    assert "PERCEPTION_AUTH_TOKENS" not in {**env, **env_file}
    assert not {"PERCEPTION_TLS_CERT", "PERCEPTION_TLS_KEY", "PERCEPTION_AUTH_TOKEN_FILE"} & set(env_file), (
        "would override the credentials")
    for settings in (env, env_file):
        assert not secrets_in("\n".join(f"{k}={v}" for k, v in settings.items()))
    # /metrics is plain HTTP without auth: loopback on a vehicle.
    from server.config import load_config

    assert load_config(env=env_file).metrics_host in LOOPBACK
    # The README puts the file each credential is loaded from there, private ones root-only.
    for cred, source in creds.items():
        placement = placed_at(source)
        assert placement is not None, f"deploy/README.md does not place the {cred} credential at {source}"
        assert placement.name == cred
        private = cred in (key_id, tokens_id)
        assert placement.mode == ("0600" if private else "0644"), f"{source}: mode {placement.mode}"
    encrypted = [p for p in placements() if p.tool == "systemd-creds"]
    assert {p.credential_name for p in encrypted} == {key_id, tokens_id}
    for placement in encrypted:
        assert placement.credential_name == placement.name, "the embedded name must be the credential's ID"
        assert f"LoadCredentialEncrypted={placement.credential_name}:{placement.dest}" in secrets_section()


def _expand(arg: str, settings: Mapping[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}", lambda m: settings[m.group(1)], arg)


def test_unit_serves_tls_and_tokens_from_its_credentials(tmp_path: Path, tiny_manifest: Path, pki: Path) -> None:
    """The unit's whole ExecStart (supervisor options included) with systemd's side played by the
    test: the credentials copied into $CREDENTIALS_DIRECTORY and ${CREDENTIALS_DIRECTORY}
    expanded, the environment file over Environment=. READY=1, the watchdog fed by health checks
    over TLS, token required."""
    if not module_written("server.cli"):
        pytest.skip("server.cli is not in this tree yet")
    unit = parse_unit(UNIT.read_text())
    creds_dir = tmp_path / "credentials"
    creds_dir.mkdir()
    for cred in unit_credentials(unit):
        shutil.copy(pki / cred, creds_dir / cred)
        (creds_dir / cred).chmod(0o400)
    settings = dict(unit_environment(unit))  # the unit sets none today; systemd would apply them
    settings.update(parse_env_file(VEHICLE / "perception.env"))
    settings.update(PERCEPTION_MODEL=str(tiny_manifest), PERCEPTION_PORT="0", PERCEPTION_METRICS_PORT="0",
                    PERCEPTION_HOST="127.0.0.1", PERCEPTION_ENGINE_CACHE_DIR=str(tmp_path / "cache"),
                    CREDENTIALS_DIRECTORY=str(creds_dir))
    argv = [_expand(a, settings) for a in shlex.split(unit["Service"]["ExecStart"][0])]
    split = argv.index("--")
    command = [sys.executable, str(VEHICLE / "sd_supervise.py"), *argv[2:split], "--", PERCEPTION, *argv[split + 2 :]]
    notify = NotifySocket(tmp_path / "notify.sock")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PERCEPTION_")}
    env.update(settings, NOTIFY_SOCKET=str(notify.path), WATCHDOG_USEC="1000000", OMP_NUM_THREADS="1")
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            cwd=tmp_path)
    try:
        assert proc.stderr is not None
        assert notify.wait_for("READY=1", 60), f"no READY=1: {proc.stderr.read() if proc.poll() is not None else ''}"
        address = next(m for m in notify.messages if "READY=1" in m).split("STATUS=serving ")[1].strip()
        # WATCHDOG_USEC=1 s -> a ping every 0.5 s while health over TLS answers SERVING.
        deadline = time.monotonic() + 10
        while sum("WATCHDOG=1" in m for m in notify.messages) < 2 and time.monotonic() < deadline:
            notify.wait_for("never", 0.3)
        assert sum("WATCHDOG=1" in m for m in notify.messages) >= 2, "the watchdog's TLS health check fails"
        assert_tls_and_token_required(address, pki)
        # `systemctl reload` (ExecReload= sends SIGHUP to the supervisor): passed on, the
        # server reloads its model and goes on serving; it used to end the supervisor.
        assert "kill -HUP $MAINPID" in unit["Service"]["ExecReload"][0]
        pings = sum("WATCHDOG=1" in m for m in notify.messages)
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while sum("WATCHDOG=1" in m for m in notify.messages) < pings + 2 and time.monotonic() < deadline:
            notify.wait_for("never", 0.3)
        assert proc.poll() is None, "SIGHUP ended the service"
        assert sum("WATCHDOG=1" in m for m in notify.messages) >= pings + 2, "not serving after the reload"
        assert_tls_and_token_required(address, pki)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert "SIGHUP reload" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        notify.close()


# --- compose: secrets from files -----------------------------------------------------------------


def _compose() -> tuple[dict[str, Any], dict[str, str], SimpleNamespace]:
    """The compose file, its server's secrets (container path -> secret name) and settings."""
    compose = yaml.safe_load(COMPOSE.read_text())
    service = compose["services"]["perception"]
    mounted = {}
    for entry in service["secrets"]:
        if isinstance(entry, str):
            entry = {"source": entry}
        source, target = entry["source"], entry.get("target", entry["source"])
        mounted[target if target.startswith("/") else f"/run/secrets/{target}"] = source
    return compose, mounted, serve_settings(server_argv(compose), server_env(compose))


def test_compose_takes_tls_and_tokens_from_secret_files() -> None:
    compose, mounted, args = _compose()
    service = compose["services"]["perception"]
    for path in (args.tls_cert, args.tls_key, args.auth_token_file):
        assert path in mounted, f"{path} is not a compose secret"
    test = service["healthcheck"]["test"]
    assert test[0] == "CMD"
    health = parse_perception_argv(test[1:])
    assert health.tls_ca in mounted and health.server.rpartition(":")[2] == str(args.port)
    for name in mounted.values():
        source = (COMPOSE.parent / compose["secrets"][name]["file"]).resolve()
        assert source.parent == COMPOSE.parent / "secrets"
        assert placed_at(source) is not None, f"deploy/README.md does not copy a file to {source}"
    assert not secrets_in(yaml.safe_dump(service)), "a secret value in the compose service"
    # Compose bind-mounts file secrets with their host owner and mode: the README makes the
    # private ones readable by the image's group, and by nobody else.
    user, _, group = parse_dockerfile(REPO_ROOT / "Dockerfile").stage("runtime").of("USER")[-1].args.partition(":")
    private = {str((COMPOSE.parent / compose["secrets"][mounted[p]]["file"]).resolve().relative_to(REPO_ROOT))
               for p in (args.tls_key, args.auth_token_file)}
    lines = [c for b in indented_blocks(secrets_section()) for c in commands(b)]
    chgrp = next(c for c in lines if c[0] == "chgrp" and private & set(c[2:]))
    chmod = next(c for c in lines if c[0] == "chmod" and private & set(c[2:]))
    assert private <= set(chgrp[2:]) and private <= set(chmod[2:])
    assert chgrp[1] == (group or user)
    mode = int(chmod[1], 8)
    assert mode & 0o040 and not mode & 0o007, f"chmod {chmod[1]}"


def test_compose_server_and_healthcheck_work_with_the_readme_secrets(tiny_manifest: Path, pki: Path,
                                                                    tmp_path: Path) -> None:
    if not (module_written("server.cli") and module_written("server.health_cli")):
        pytest.skip("server.cli / server.health_cli are not in this tree yet")
    compose, mounted, _ = _compose()
    run_secrets = tmp_path / "run-secrets"
    run_secrets.mkdir()
    for path, name in mounted.items():
        shutil.copy(pki / PurePosixPath(compose["secrets"][name]["file"]).name, run_secrets / PurePosixPath(path).name)
    mounts = {"/run/secrets": run_secrets}
    extra = [relocate(a, mounts) for a in compose["services"]["perception"]["command"]]
    with serve([PERCEPTION, "serve"], tiny_manifest, extra=extra) as server:
        assert_tls_and_token_required(server.address, pki)
        result = run_health(compose["services"]["perception"]["healthcheck"]["test"][1:], server.address, mounts)
        assert result.returncode == 0, result.stderr
        assert server.stop() == 0


# --- a single container serving TLS: the image's own HEALTHCHECK ---------------------------------


@pytest.mark.parametrize("stage", ["runtime", "runtime-gpu"])
def test_image_healthcheck_checks_a_tls_server_with_the_ca_env(tiny_manifest: Path, pki: Path, stage: str) -> None:
    """`docker run ... IMAGE --tls-cert ... --tls-key ...` with `-e PERCEPTION_HEALTH_TLS_CA=...`
    (deploy/README.md): the image's HEALTHCHECK, run by a real shell, verifies the server over
    TLS; without the variable it speaks plaintext and the TLS server is (rightly) unhealthy."""
    if not (module_written("server.cli") and module_written("server.health_cli")):
        pytest.skip("server.cli / server.health_cli are not in this tree yet")
    health = healthcheck_exec(parse_dockerfile(REPO_ROOT / "Dockerfile").stage(stage).of("HEALTHCHECK")[0])
    env = {k: v for k, v in os.environ.items() if not k.startswith("PERCEPTION_")}
    env["PATH"] = f"{Path(PERCEPTION).parent}{os.pathsep}{env.get('PATH', '')}"
    tls = ["--tls-cert", str(pki / "tls.crt"), "--tls-key", str(pki / "tls.key"),
           "--auth-token-file", str(pki / "tokens")]
    with serve([PERCEPTION, "serve"], tiny_manifest, extra=tls) as server:
        env["PERCEPTION_PORT"] = str(server.port)  # the server's port, which the check asks
        ok = subprocess.run(health, env={**env, "PERCEPTION_HEALTH_TLS_CA": str(pki / "ca.crt")},
                            capture_output=True, text=True, timeout=30)
        assert ok.returncode == 0, ok.stderr
        plain = subprocess.run(health, env=env, capture_output=True, text=True, timeout=30)
        assert plain.returncode != 0
        assert server.stop() == 0


def test_readme_creation_block_leaves_the_callers_shell_as_it_was(tmp_path: Path) -> None:
    """The block runs in a subshell: its `umask 077` and `cd` must not outlive it, or the
    install.sh / install / cp commands run next from the same shell make the venv and models
    unreadable to the service's dynamic user."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl CLI is not installed")
    script = f"umask 022\n{creation_block()}\numask\npwd\n"
    result = subprocess.run(["bash", "-e", "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[-2:] == ["0022", str(tmp_path)]
    assert stat.S_IMODE((tmp_path / CREATED_IN / "tls.key").stat().st_mode) & 0o077 == 0, "secrets still private"
