# syntax=docker/dockerfile:1.7
#
# perception: build the default model's artifacts with PyTorch, serve them without it.
#
#   docker build -t perception:cpu .                                   # CPU runtime (default target)
#   docker build -t perception:gpu --target runtime-gpu .              # NVIDIA TensorRT runtime
#   docker build --build-context checkpoint=/path/to/ckpt_dir \
#                --build-arg CHECKPOINT_FILE=detector.pt -t perception:mine .   # your own weights
#
# Stages:
#   checkpoint   the weights the build stage compiles: models/default/ unless replaced by a
#                named build context (--build-context checkpoint=DIR), so no weights need
#                to be copied into the repository to build an image of them.
#   build        PyTorch (CPU wheel) + the build stage: fold BN, export ONNX, quantize, gate,
#                write /artifacts/default/manifest.json. Runs on the build host's platform:
#                ONNX artifacts are portable; TensorRT engines are not and are built on the
#                device on first start (runtime-gpu).
#   runtime-gpu  NVIDIA TensorRT base; server + client with the gpu extra; engines cached in
#                the /cache volume. For Jetson (L4T) see deploy/README.md.
#   runtime      python slim + onnxruntime on CPU; server + client + artifacts; no torch.
#
# The runtime stages install through deploy/vehicle/install.sh, the same script a vehicle
# computer without containers runs; tests/deploy/test_runtime_recipe.py runs it in a fresh
# virtual environment so this recipe cannot rot unnoticed.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG GPU_IMAGE=nvcr.io/nvidia/tensorrt:25.01-py3

# --------------------------------------------------------------------------- checkpoint
FROM scratch AS checkpoint
COPY models/default/ /

# --------------------------------------------------------------------------- build
FROM --platform=$BUILDPLATFORM ${PYTHON_IMAGE} AS build
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG CHECKPOINT_FILE=detector.pt
# The pruned twin, built and gated beside it (its pruned_int8 is the shipped default variant,
# as in `make demo`). "auto": detector_pruned.pt when the checkpoint directory has one (the
# shipped models/default/ does; a training run's directory does not), else none. A file named
# here must exist; --build-arg PRUNED_FILE= builds without a twin.
ARG PRUNED_FILE=auto
ARG MODEL_NAME=default
# Extra flags for `perception build`, e.g. --build-arg BUILD_FLAGS="--continue-on-fail".
ARG BUILD_FLAGS=""
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    OMP_NUM_THREADS=2
WORKDIR /src
COPY pyproject.toml ./
COPY proto ./proto
COPY perception ./perception
COPY build_engine ./build_engine
COPY server ./server
COPY client ./client
# torch pinned exactly and taken from the CPU wheel index: a looser pin or the default
# index pulls a multi-GB CUDA build into a stage that never sees a GPU.
RUN python -m pip install --extra-index-url "${TORCH_INDEX_URL}" "torch==2.13.0" \
    && python -m pip install --extra-index-url "${TORCH_INDEX_URL}" -e ".[build]" "grpcio-tools>=1.62"
# The wire contract's stubs: exactly the Makefile's `proto` target.
RUN python -m grpc_tools.protoc -Iproto --python_out=. --pyi_out=. --grpc_python_out=. \
        proto/perception/v1/admin.proto proto/perception/v1/detector.proto \
    && python -m grpc_tools.protoc -Iproto/kserve --python_out=perception/v1 --pyi_out=perception/v1 \
        proto/kserve/grpc_predict_v2.proto proto/kserve/model_config.proto
RUN --mount=type=bind,from=checkpoint,target=/checkpoint \
    pruned="${PRUNED_FILE}"; \
    if [ "${pruned}" = auto ]; then \
        pruned=""; if [ -f /checkpoint/detector_pruned.pt ]; then pruned=detector_pruned.pt; fi; \
    fi; \
    perception build --checkpoint "/checkpoint/${CHECKPOINT_FILE}" \
        ${pruned:+--pruned "/checkpoint/${pruned}"} --name "${MODEL_NAME}" \
        --out /artifacts/default ${BUILD_FLAGS} \
    && test -f /artifacts/default/manifest.json

# --------------------------------------------------------------------------- runtime-gpu
FROM ${GPU_IMAGE} AS runtime-gpu
# Jetson (L4T) bases: RUNTIME_EXTRAS=server,client,jetson (no onnxruntime-gpu / tensorrt wheels
# for Jetson on PyPI; the JetPack TensorRT bindings come from the base image, cuda-python from
# the extra); run it with --group-add video for the GPU device nodes. deploy/README.md.
ARG RUNTIME_EXTRAS=server,client,gpu
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# The TensorRT image ships python3 and the TensorRT bindings system-wide; the venv sees
# them (PERCEPTION_SYSTEM_SITE_PACKAGES=1) so pip does not pull a second TensorRT.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3-venv \
    && rm -rf /var/lib/apt/lists/*
ENV INSTALL_PREFIX=/opt/perception \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PERCEPTION_SYSTEM_SITE_PACKAGES=1
WORKDIR /opt/perception/src
COPY pyproject.toml ./
COPY proto ./proto
COPY perception ./perception
COPY server ./server
COPY client ./client
COPY deploy/vehicle/install.sh ./deploy/vehicle/install.sh
RUN PYTHON=python3 deploy/vehicle/install.sh "${INSTALL_PREFIX}" "${RUNTIME_EXTRAS}"
RUN groupadd --system --gid 10001 perception \
    && useradd --system --uid 10001 --gid perception --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin perception \
    && mkdir -p /cache \
    && chown perception:perception /cache
COPY --from=build /artifacts/default /models/default
# The server's settings are PERCEPTION_* variables, not flags in the ENTRYPOINT, so that `docker
# run -e`, compose's environment and a Kubernetes ConfigMap can change them (a flag would beat
# them). The HEALTHCHECK asks the port PERCEPTION_PORT names: move the port with it, not --port.
# TensorRT engines are specific to the GPU, TensorRT version and precision: build them on
# first start and keep them in the mounted cache (server/runtime/fingerprint.py refuses a
# mismatched engine, so a cache shared across devices is safe, only slower once).
ENV PATH=/opt/perception/venv/bin:$PATH \
    PERCEPTION_MODEL=/models/default/manifest.json \
    PERCEPTION_HOST=0.0.0.0 \
    PERCEPTION_PORT=50051 \
    PERCEPTION_METRICS_HOST=0.0.0.0 \
    PERCEPTION_METRICS_PORT=9108 \
    PERCEPTION_BACKENDS=tensorrt,onnxruntime-cuda,onnxruntime-cpu \
    PERCEPTION_ENGINE_CACHE_DIR=/cache \
    PERCEPTION_BUILD_ENGINE_ON_START=1 \
    PERCEPTION_ENGINE_PRECISION=fp16 \
    NUMBA_CACHE_DIR=/tmp/perception-numba
# The commit built (perception_build_info{git_sha}); the build context has no .git:
#   docker build --build-arg GIT_SHA="$(git rev-parse HEAD)" ...
# Declared after the install so a new commit does not invalidate its cached layers.
ARG GIT_SHA=unknown
ENV PERCEPTION_GIT_SHA=${GIT_SHA}
VOLUME ["/cache"]
WORKDIR /
USER 10001:10001
EXPOSE 50051 9108
# First start builds the engine (minutes on a Jetson): a long start period.
# gRPC health over TLS when the server serves TLS (--tls-cert): run the container with
# -e PERCEPTION_HEALTH_TLS_CA=<the CA file, mounted> (and _CERT / _KEY for mutual TLS); without
# them the check speaks plaintext. The certificate must name 127.0.0.1 (deploy/README.md).
HEALTHCHECK --interval=10s --timeout=5s --start-period=600s --retries=3 \
    CMD ["/bin/sh", "-c", "exec perception health --server 127.0.0.1:${PERCEPTION_PORT:-50051} --timeout 3 ${PERCEPTION_HEALTH_TLS_CA:+--tls-ca \"$PERCEPTION_HEALTH_TLS_CA\"} ${PERCEPTION_HEALTH_TLS_CERT:+--tls-cert \"$PERCEPTION_HEALTH_TLS_CERT\"} ${PERCEPTION_HEALTH_TLS_KEY:+--tls-key \"$PERCEPTION_HEALTH_TLS_KEY\"}"]
ENTRYPOINT ["perception", "serve"]

# --------------------------------------------------------------------------- runtime (default)
FROM ${PYTHON_IMAGE} AS runtime
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV INSTALL_PREFIX=/opt/perception \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
WORKDIR /opt/perception/src
COPY pyproject.toml ./
COPY proto ./proto
COPY perception ./perception
COPY server ./server
COPY client ./client
COPY deploy/vehicle/install.sh ./deploy/vehicle/install.sh
RUN PYTHON=python3 deploy/vehicle/install.sh "${INSTALL_PREFIX}" server,client
RUN groupadd --system --gid 10001 perception \
    && useradd --system --uid 10001 --gid perception --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin perception
# Artifacts stay root-owned: the service reads them and can never rewrite them.
COPY --from=build /artifacts/default /models/default
# The server's settings are PERCEPTION_* variables, not flags in the ENTRYPOINT, so that `docker
# run -e`, compose's environment and a Kubernetes ConfigMap can change them (a flag would beat
# them). The HEALTHCHECK asks the port PERCEPTION_PORT names: move the port with it, not --port.
# NUMBA_CACHE_DIR: the multi-object tracker's compiled loops (perception.tracking.kernels) are
# compiled when the tracker is loaded (the first tracked frame, or the start with
# PERCEPTION_PRELOAD_TRACKER=true), about 10 s, and kept there while /tmp lives: a Kubernetes
# emptyDir keeps them across the pod's container restarts; the compose file's tmpfs and
# `docker run --tmpfs /tmp` are new at every start. With no writable place they are compiled anyway.
# No PERCEPTION_THREADS: the server sizes inference to the container's cores (on a CPU, one
# one-thread run per core, measured faster than one run on every core: docs/performance.md).
ENV PATH=/opt/perception/venv/bin:$PATH \
    PERCEPTION_MODEL=/models/default/manifest.json \
    PERCEPTION_HOST=0.0.0.0 \
    PERCEPTION_PORT=50051 \
    PERCEPTION_METRICS_HOST=0.0.0.0 \
    PERCEPTION_METRICS_PORT=9108 \
    PERCEPTION_BACKENDS=onnxruntime-cpu \
    NUMBA_CACHE_DIR=/tmp/perception-numba
# The commit built (perception_build_info{git_sha}); the build context has no .git:
#   docker build --build-arg GIT_SHA="$(git rev-parse HEAD)" ...
# Declared after the install so a new commit does not invalidate its cached layers.
ARG GIT_SHA=unknown
ENV PERCEPTION_GIT_SHA=${GIT_SHA}
WORKDIR /
USER 10001:10001
EXPOSE 50051 9108
# gRPC health over TLS when the server serves TLS (--tls-cert): run the container with
# -e PERCEPTION_HEALTH_TLS_CA=<the CA file, mounted> (and _CERT / _KEY for mutual TLS); without
# them the check speaks plaintext. The certificate must name 127.0.0.1 (deploy/README.md).
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["/bin/sh", "-c", "exec perception health --server 127.0.0.1:${PERCEPTION_PORT:-50051} --timeout 3 ${PERCEPTION_HEALTH_TLS_CA:+--tls-ca \"$PERCEPTION_HEALTH_TLS_CA\"} ${PERCEPTION_HEALTH_TLS_CERT:+--tls-cert \"$PERCEPTION_HEALTH_TLS_CERT\"} ${PERCEPTION_HEALTH_TLS_KEY:+--tls-key \"$PERCEPTION_HEALTH_TLS_KEY\"}"]
ENTRYPOINT ["perception", "serve"]
