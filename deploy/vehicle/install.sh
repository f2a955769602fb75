#!/usr/bin/env bash
# Install the on-vehicle runtime (server + client, no PyTorch) into PREFIX/venv.
#
#   deploy/vehicle/install.sh PREFIX [EXTRAS]      (run from the repository root)
#
# This is the one recipe for every torch-free install: the Dockerfile's runtime stage runs it,
# a vehicle computer without containers runs it, and tests/deploy/test_runtime_recipe.py runs
# it in a fresh virtual environment so the image's recipe cannot rot unnoticed.
# EXTRAS defaults to "server,client"; the GPU image passes "server,client,gpu".
set -euo pipefail
# Everything installed is for the service to read: a dynamic user (the vehicle's unit) or the
# image's user, never the installer. A caller's umask 077 (e.g. left from making the secrets)
# would make the venv unreadable to it.
umask 022

prefix="${1:?usage: deploy/vehicle/install.sh PREFIX [EXTRAS]}"
extras="${2:-server,client}"
python="${PYTHON:-python3}"

if [[ ! -f pyproject.toml || ! -d proto/perception/v1 ]]; then
    echo "install.sh: run from the repository root (pyproject.toml and proto/ not found in $PWD)" >&2
    exit 2
fi

prefix="$("$python" -c 'import os, sys; print(os.path.abspath(sys.argv[1]))' "$prefix")"  # we cd below

# --system-site-packages only for the GPU image, whose base image ships the TensorRT bindings.
venv_flags=()
if [[ "${PERCEPTION_SYSTEM_SITE_PACKAGES:-0}" == "1" ]]; then
    venv_flags+=(--system-site-packages)
fi
"$python" -m venv "${venv_flags[@]}" "$prefix/venv"

# The stubs are generated and the package built in a copy of the sources: run with sudo in a
# checkout, generating them there left root-owned files that a later `make setup` could not
# rewrite.
src="$(mktemp -d)"
trap 'rm -rf "$src"' EXIT
for part in pyproject.toml README.md proto perception build_engine server client; do
    if [[ -e "$part" ]]; then cp -r "$part" "$src/"; fi
done
# The commit installed, for perception_build_info{git_sha}: the copy has no .git, so it is
# recorded in the package (server/build_info.json, read by server.metrics). PERCEPTION_GIT_SHA
# overrides; an install from a tree that is not a git checkout records nothing ("unknown").
git_sha="${PERCEPTION_GIT_SHA:-}"
if [[ -z "$git_sha" || "$git_sha" == "unknown" ]] && command -v git >/dev/null 2>&1; then
    # safe.directory: run with sudo in a checkout another user owns, git would refuse it.
    git_sha="$(git -c safe.directory="$PWD" rev-parse --verify -q HEAD 2>/dev/null || true)"
fi
if [[ -n "$git_sha" && "$git_sha" != "unknown" ]]; then
    if [[ ! "$git_sha" =~ ^[0-9A-Za-z._-]+$ ]]; then
        echo "install.sh: PERCEPTION_GIT_SHA must be a commit id, got '$git_sha'" >&2
        exit 2
    fi
    printf '{"git_sha": "%s"}\n' "$git_sha" >"$src/server/build_info.json"
fi
cd "$src"
pip=("$prefix/venv/bin/python" -m pip --no-cache-dir --disable-pip-version-check)

# 1. Python stubs from the wire contract: exactly the Makefile's `proto` target. grpcio-tools
#    is needed only for this step and is removed again so the runtime carries no compiler.
"${pip[@]}" install --quiet "grpcio-tools>=1.62"
"$prefix/venv/bin/python" -m grpc_tools.protoc -Iproto --python_out=. --pyi_out=. --grpc_python_out=. \
    proto/perception/v1/admin.proto proto/perception/v1/detector.proto
"$prefix/venv/bin/python" -m grpc_tools.protoc -Iproto/kserve --python_out=perception/v1 --pyi_out=perception/v1 \
    proto/kserve/grpc_predict_v2.proto proto/kserve/model_config.proto

# 2. The package itself with the runtime extras only: no torch, no build stage.
"${pip[@]}" install --quiet ".[${extras}]"
"${pip[@]}" uninstall --quiet --yes grpcio-tools
# onnxruntime (server extra) and onnxruntime-gpu (gpu extra) install the same `onnxruntime`
# module; whichever lands last wins file by file. Keep only the GPU build.
if [[ ",${extras}," == *",gpu,"* ]]; then
    "${pip[@]}" uninstall --quiet --yes onnxruntime
    "${pip[@]}" install --quiet --force-reinstall --no-deps onnxruntime-gpu
fi

# 3. Fail the install, not the first frame, if the recipe pulled in torch or lost a command.
"$prefix/venv/bin/python" - <<'PY'
import importlib.util
import sys

if importlib.util.find_spec("torch") is not None:
    sys.exit("install.sh: torch is importable in the runtime environment; it must not be")
import perception.v1.detector_pb2  # noqa: F401  (the generated contract is installed)
import server, client  # noqa: E401,F401
PY
"$prefix/venv/bin/perception" --version >/dev/null
echo "install.sh: runtime installed in $prefix/venv (extras: $extras)"
