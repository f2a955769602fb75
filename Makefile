# The README's two commands:
#   make demo   set up, build the default model's engines, serve them, replay the bundled drive
#   make test   set up and run the whole test suite (what .ci/run calls)
#   make lint   ruff + mypy over the code and tests (also run by .ci/run)
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Beside numba's cache itself (gitignored), so that removing the cache removes the mark too.
TRACKER_CACHE := perception/tracking/__pycache__/.kernels-compiled
PROTO_SRC := $(wildcard proto/perception/v1/*.proto)
# KServe's Open Inference Protocol, vendored as published (package `inference`), and the subset
# of Triton's ModelConfig extension the server answers. Their messages are generated beside ours;
# server.kserve registers the service's handlers itself.
KSERVE_PROTO := proto/kserve/grpc_predict_v2.proto proto/kserve/model_config.proto
PROTO_OUT := perception/v1/detector_pb2.py perception/v1/grpc_predict_v2_pb2.py perception/v1/model_config_pb2.py

.PHONY: demo test setup proto bench clean lint

setup: $(STAMP) $(PROTO_OUT) $(TRACKER_CACHE)

# torch==2.13.0: PyPI's Linux wheel is the CUDA build (GBs). Where no CPU wheel of it is at hand
# (these machines have one), TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu takes the CPU build.
TORCH_INDEX_URL ?=
PIP_TORCH := $(if $(TORCH_INDEX_URL),--extra-index-url $(TORCH_INDEX_URL))

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV) || { echo "make: cannot create $(VENV): $(PYTHON) needs its venv module (Debian / Ubuntu: apt-get install python3-venv)" >&2; exit 1; }
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(PIP_TORCH) -e '.[test]'
	touch $(STAMP)

# The tracker's compiled loops, compiled once into numba's cache beside their source (about 10 s),
# so that no test, bench or server here waits for that compile on its first tracked frame.
$(TRACKER_CACHE): perception/tracking/kernels.py $(STAMP)
	$(PY) -c "from perception.tracking import kernels; kernels.warm()"
	mkdir -p $(dir $(TRACKER_CACHE)) && touch $(TRACKER_CACHE)

# Python stubs are generated from the contract, never edited by hand.
$(PROTO_OUT) &: $(PROTO_SRC) $(KSERVE_PROTO) $(STAMP)
	$(PY) -m grpc_tools.protoc -Iproto --python_out=. --pyi_out=. --grpc_python_out=. $(PROTO_SRC)
	$(PY) -m grpc_tools.protoc -Iproto/kserve --python_out=perception/v1 --pyi_out=perception/v1 $(KSERVE_PROTO)

proto: $(PROTO_OUT)

demo: setup
	PY=$(PY) bash scripts/demo.sh

test: setup
	bash scripts/test_services.sh
	$(PY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

# TensorRT itself cannot be installed on CPU machines, so mypy checks the TensorRT calls against
# the `tensorrt-stubs` package, installed without its dependencies and repaired by the script.
TRT_STUBS := $(VENV)/.tensorrt-stubs
LINT_PATHS := perception build_engine server client bench tests scripts

$(TRT_STUBS): scripts/install_tensorrt_stubs.py $(STAMP)
	$(PY) scripts/install_tensorrt_stubs.py
	touch $(TRT_STUBS)

# Both checkers always run, so one pass reports every problem; either one failing fails lint.
lint: setup $(TRT_STUBS)
	@status=0; \
	echo "$(PY) -m ruff check $(LINT_PATHS)"; $(PY) -m ruff check $(LINT_PATHS) || status=1; \
	echo "$(PY) -m mypy $(LINT_PATHS)"; $(PY) -m mypy $(LINT_PATHS) || status=1; \
	exit $$status

bench: setup
	$(PY) -m bench.run_all

clean:
	rm -rf $(VENV) artifacts/demo perception/v1/*_pb2*.py perception/v1/*_pb2*.pyi
