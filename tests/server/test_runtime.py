"""Runtime selection and the TensorRT engine fingerprint (pure parts; GPU parts skipped here)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
from typing import Any

import numpy as np
import pytest

from perception.errors import ModelError
from perception.manifest import load_manifest
from server.runtime.availability import tensorrt_installed
from server.runtime.base import Backend
from server.runtime.factory import Availability, RuntimeSettings, backend_for, plan
from server.runtime.fingerprint import EngineFingerprint, check_engine, mismatches, write_fingerprint

HAS_TRT = tensorrt_installed()


def test_plan_follows_preference_and_skips_what_is_missing():
    pref = ("tensorrt", "onnxruntime-cuda", "onnxruntime-cpu")
    cpu_only = Availability(tensorrt=False, ort_providers=frozenset({"CPUExecutionProvider"}))
    tries, skipped = plan(pref, cpu_only)
    assert tries == ["onnxruntime-cpu"]
    assert "not installed" in skipped["tensorrt"] and "CUDAExecutionProvider" in skipped["onnxruntime-cuda"]
    gpu = Availability(tensorrt=True, ort_providers=frozenset({"CUDAExecutionProvider", "CPUExecutionProvider"}))
    assert plan(pref, gpu)[0] == list(pref)
    assert plan(("onnxruntime-cpu", "tensorrt"), gpu)[0] == ["onnxruntime-cpu", "tensorrt"]


def test_backend_for_falls_back_to_cpu(tiny_manifest):
    m = load_manifest(tiny_manifest)
    # TensorRT "available" but failing to load (no engine, not installed): falls through to CPU.
    avail = Availability(tensorrt=True, ort_providers=frozenset({"CPUExecutionProvider"}))
    backend, variant = backend_for(m, "", RuntimeSettings(threads=1, max_batch=4),
                                   preference=("tensorrt", "onnxruntime-cpu"), avail=avail)
    try:
        assert isinstance(backend, Backend)
        assert backend.name == "onnxruntime-cpu" and variant.name == "fp32" and backend.max_batch == 4
        out = backend.infer(np.zeros((3, 3, 48, 64), np.float32))
        assert set(out) == {"output"} and out["output"].shape == (3, 48, 12)
        assert [o.name for o in backend.outputs] == ["output"] and backend.outputs[0].shape[-1] == 12
    finally:
        backend.deactivate()
    with pytest.raises(ModelError, match="no inference backend"):
        backend_for(m, preference=("onnxruntime-cuda",),
                    avail=Availability(tensorrt=False, ort_providers=frozenset({"CPUExecutionProvider"})))


def _artifact_and_another_model(tiny_manifest, tmp_path):
    """(a copy of the tiny artifact, loaded; the bytes of another model of the same shape)."""
    import shutil

    from tests.tiny_model import make_tiny_onnx

    shutil.copytree(tiny_manifest.parent, tmp_path / "art")
    make_tiny_onnx(tmp_path / "other.onnx", seed=3)
    return load_manifest(tmp_path / "art"), (tmp_path / "other.onnx").read_bytes()


def test_an_onnx_file_replaced_after_its_manifest_loaded_is_refused(tiny_manifest, tmp_path):
    """The manifest's checks passed, then the file changed: onnxruntime is not given it."""
    from perception.errors import ManifestError

    m, other = _artifact_and_another_model(tiny_manifest, tmp_path)
    m.path_of(m.variant()).write_bytes(other)
    with pytest.raises(ManifestError, match="does not match its sha256"):
        backend_for(m, "", RuntimeSettings(threads=1, max_batch=1))


def test_the_session_is_made_from_the_bytes_that_were_hashed(tiny_manifest, tmp_path, monkeypatch):
    """The file is replaced by another model after it was hashed, just before onnxruntime makes
    its session (a real one): the model served is still the one hashed."""
    import onnxruntime as ort

    from server.runtime.onnxruntime_backend import OnnxRuntimeBackend

    m, other = _artifact_and_another_model(tiny_manifest, tmp_path)
    path = m.path_of(m.variant())
    x = np.random.default_rng(0).random((2, 3, 48, 64), dtype=np.float32)
    outputs = {}
    for name, model in (("hashed", path), ("other", tmp_path / "other.onnx")):
        ref = OnnxRuntimeBackend(model, intra_op_threads=1)
        ref.activate()
        outputs[name] = ref.infer(x)["output"]
        ref.deactivate()
    assert not np.allclose(outputs["hashed"], outputs["other"])
    make_session = ort.InferenceSession

    def replace_then_make(model: Any, *args: Any, **kw: Any) -> Any:
        path.write_bytes(other)
        return make_session(model, *args, **kw)

    monkeypatch.setattr(ort, "InferenceSession", replace_then_make)
    backend, _ = backend_for(m, "", RuntimeSettings(threads=1, max_batch=2))
    try:
        assert path.read_bytes() == other
        np.testing.assert_allclose(backend.infer(x)["output"], outputs["hashed"], rtol=1e-6)
    finally:
        backend.deactivate()


def test_a_model_with_external_weights_still_loads(tmp_path, monkeypatch):
    """A model with external weights, checked against its manifest hash, still loads with its
    weights found beside its file, wherever the server runs from (it is opened by path: as
    bytes only newer onnxruntimes could be told where its weights are)."""
    import onnx

    from perception.manifest import sha256_file
    from server.runtime.onnxruntime_backend import OnnxRuntimeBackend
    from tests.tiny_model import make_tiny_onnx

    make_tiny_onnx(tmp_path / "single.onnx")
    art = tmp_path / "art"
    art.mkdir()
    onnx.save(onnx.load(str(tmp_path / "single.onnx")), str(art / "model.onnx"), save_as_external_data=True,
              location="model.weights", size_threshold=1024)
    assert (art / "model.weights").stat().st_size > 0
    monkeypatch.chdir(tmp_path)
    x = np.random.default_rng(0).random((2, 3, 48, 64), dtype=np.float32)
    single = OnnxRuntimeBackend(tmp_path / "single.onnx", intra_op_threads=1)
    external = OnnxRuntimeBackend(art / "model.onnx", intra_op_threads=1, sha256=sha256_file(art / "model.onnx"))
    single.activate()
    external.activate()
    np.testing.assert_allclose(external.infer(x)["output"], single.infer(x)["output"], rtol=1e-6)


def fp(**kw: Any) -> EngineFingerprint:
    base = EngineFingerprint(tensorrt_version="10.3.0", compute_capability="8.7", precision="fp16",
                             onnx_sha256="ab" * 32, max_batch=8, device_name="Orin")
    return dataclasses.replace(base, **kw)


def test_fingerprint_mismatches_are_explained():
    assert mismatches(fp(), fp()) == []
    assert mismatches(fp(max_batch=8), fp(max_batch=4)) == []  # a wider batch range is fine
    probs = mismatches(fp(tensorrt_version="10.0.1", compute_capability="8.6"), fp())
    assert any("TensorRT 10.0.1 built it, this device runs 10.3.0" in p for p in probs)
    assert any("compute capability 8.6" in p and "8.7" in p for p in probs)
    assert mismatches(fp(precision="int8"), fp()) and mismatches(fp(onnx_sha256="cd" * 32), fp())
    assert fp().cache_name() != fp(compute_capability="8.6").cache_name()
    # Timing caches are shared across models and precisions, never across TensorRT versions or GPUs.
    shared = fp(precision="int8", onnx_sha256="cd" * 32).timing_cache_name()
    assert fp().timing_cache_name() == shared == "timing.trt10.3.0.sm87.cache"
    assert fp().timing_cache_name() != fp(tensorrt_version="10.0.1").timing_cache_name()
    assert EngineFingerprint.from_json(fp().to_json()) == fp()


def test_a_dynamic_size_model_at_another_size_is_another_engine():
    """An ONNX with dynamic height and width served at 512x288 and at 1024x576 (two imports of
    one file with --input-size) are two engines, under two names; a fixed-size model keeps the
    name it had, so no device rebuilds its engine for this."""
    from server.runtime.fingerprint import dynamic_input_size

    assert dynamic_input_size((-1, 3, -1, -1), 512, 288) == "512x288"
    assert dynamic_input_size((-1, 3, 288, 512), 512, 288) == ""
    small, large = fp(input_size="512x288"), fp(input_size="1024x576")
    assert small.cache_name() != large.cache_name() != fp().cache_name()
    old_key = f"10.3.0|8.7|fp16|{'ab' * 32}|8"  # the key before input sizes were part of it
    assert fp().cache_name() == f"model.fp16.b8.{hashlib.sha256(old_key.encode()).hexdigest()[:16]}.engine"
    assert any("built for input 512x288, the manifest needs 1024x576" in p for p in mismatches(small, large))
    assert mismatches(small, small) == [] and EngineFingerprint.from_json(small.to_json()) == small
    # A fingerprint written before the field existed reads as a fixed-size engine's.
    assert EngineFingerprint.from_json(fp().to_json().replace(',\n  "input_size": ""', "")) == fp()


def test_a_manifests_engine_record_holds_every_field_of_a_fingerprint():
    """The build writes each engine's fingerprint into the manifest as an EngineRecord, field for
    field: a field added to one and not the other crashed every build with TensorRT."""
    from perception.manifest import EngineRecord

    full = fp(input_size="512x288")
    assert EngineRecord(**dataclasses.asdict(full)) == EngineRecord(**dataclasses.asdict(full))
    assert [f.name for f in dataclasses.fields(EngineRecord)] == [f.name for f in dataclasses.fields(EngineFingerprint)]


def test_check_engine_refuses_a_mismatched_engine(tmp_path):
    engine = tmp_path / "model.engine"
    with pytest.raises(ModelError, match="does not exist"):
        check_engine(engine, fp())
    engine.write_bytes(b"serialized")
    with pytest.raises(ModelError, match="no model.engine.fingerprint.json"):
        check_engine(engine, fp())
    write_fingerprint(engine, fp(tensorrt_version="8.6.1"))
    with pytest.raises(ModelError, match=r"refusing TensorRT engine model.engine: TensorRT 8.6.1 built it.*Rebuild"):
        check_engine(engine, fp())
    write_fingerprint(engine, fp())
    check_engine(engine, fp())
    (tmp_path / "model.engine.fingerprint.json").write_text(json.dumps({"nope": 1}))
    with pytest.raises(ModelError, match="malformed"):
        check_engine(engine, fp())


def test_tensorrt_modules_import_without_tensorrt():
    for name in ("server.runtime.tensorrt_backend", "server.runtime.tensorrt_builder", "server.runtime.fingerprint"):
        __import__(name)
    if not HAS_TRT:
        assert "tensorrt" not in sys.modules


def test_tensorrt_profile_takes_dynamic_sizes_from_the_manifest():
    """The optimisation profile has no dynamic dimension left: a model imported with
    ``--input-size`` (dynamic height and width in its ONNX) is profiled at the manifest's size,
    a fixed-size model at its own; batch 1..max_batch, optimised for max_batch."""
    from server.runtime.tensorrt_builder import BuildOptions, profile_shapes

    sized = BuildOptions("fp32", 4, input_height=48, input_width=64)
    want = ([1, 3, 48, 64], [4, 3, 48, 64])
    assert profile_shapes([-1, 3, -1, -1], sized, "m.onnx") == want
    assert profile_shapes([-1, -1, -1, -1], sized, "m.onnx") == want  # the pre-processing feeds 3 channels
    assert profile_shapes([-1, 3, 48, 64], sized, "m.onnx") == want
    assert profile_shapes([-1, 3, 48, 64], BuildOptions("fp32", 4), "m.onnx") == want
    with pytest.raises(ModelError, match="m.onnx has a dynamic height: the engine build needs the manifest's"):
        profile_shapes([-1, 3, -1, -1], BuildOptions("fp32", 4), "m.onnx")
    with pytest.raises(ModelError, match="m.onnx has width 64, but the manifest's input width is 640"):
        profile_shapes([-1, 3, 48, 64], BuildOptions("fp32", 4, input_height=48, input_width=640), "m.onnx")
    with pytest.raises(ModelError, match=r"expected \(batch, 3, H, W\)"):
        profile_shapes([-1, 48, 64], sized, "m.onnx")
    with pytest.raises(ModelError, match="input height and width must be >= 1"):
        BuildOptions("fp32", 4, input_height=0, input_width=64)


def test_tensorrt_source_is_the_onnx_that_holds_the_precision(tiny_manifest, tmp_path):
    """Engines are built strongly typed, so the ONNX file carries the precision: FP16 from the
    FP16 model of the same weights family, INT8 from the INT8 variant's declared signed,
    zero-point-0 twin, never from onnxruntime's U8 model; anything else is refused in one line."""
    import shutil

    from perception.manifest import Precision, QdqTwin, sha256_file
    from server.runtime.tensorrt_engines import tensorrt_source

    m = load_manifest(tiny_manifest)
    fp32 = m.variant()
    root = m.path_of(fp32).parent
    assert tensorrt_source(m, fp32, Precision.FP32) == (root / fp32.file, fp32.sha256)
    with pytest.raises(ModelError, match="no FP16 ONNX model of variant"):
        tensorrt_source(m, fp32, Precision.FP16)
    shutil.copy(root / fp32.file, root / "half.onnx")  # any ONNX file stands in for the models here
    half = sha256_file(root / "half.onnx")
    fp16 = dataclasses.replace(fp32, name="half", precision=Precision.FP16, file="half.onnx", sha256=half,
                               parent="fp32")
    with_fp16 = dataclasses.replace(m, variants=(fp32, fp16))
    assert tensorrt_source(with_fp16, fp32, Precision.FP16) == (root / "half.onnx", half)
    other_family = dataclasses.replace(m, variants=(fp32, dataclasses.replace(fp16, family="pruned")))
    with pytest.raises(ModelError, match="no FP16 ONNX model"):
        tensorrt_source(other_family, fp32, Precision.FP16)
    twin = root / "model.int8.trt.onnx"
    shutil.copy(root / fp32.file, twin)
    int8 = dataclasses.replace(fp32, name="int8", precision=Precision.INT8, parent="fp32",
                               tensorrt_qdq=QdqTwin(twin.name, sha256_file(twin), "percentile"))
    assert tensorrt_source(m, int8, Precision.INT8) == (twin, sha256_file(twin))
    with pytest.raises(ModelError, match="cannot build a TensorRT fp32 engine from the int8"):
        tensorrt_source(m, int8, Precision.FP32)
    with pytest.raises(ModelError, match="no TensorRT Q/DQ model"):
        tensorrt_source(m, dataclasses.replace(int8, tensorrt_qdq=None), Precision.INT8)
    with pytest.raises(ModelError, match="no TensorRT Q/DQ model"):
        tensorrt_source(m, fp32, Precision.INT8)
    failed = dataclasses.replace(int8, tensorrt_qdq=QdqTwin(twin.name, sha256_file(twin), "minmax",
                                                            gate={"passed": False, "reason": "drop 3 points"}))
    with pytest.raises(ModelError, match="failed its accuracy gate"):
        tensorrt_source(m, failed, Precision.INT8)
    with pytest.raises(Exception, match="does not match its sha256"):
        bad = dataclasses.replace(int8, tensorrt_qdq=QdqTwin(twin.name, "0" * 64, "minmax"))
        tensorrt_source(m, bad, Precision.INT8)
    twin.unlink()
    with pytest.raises(Exception, match="does not exist"):
        tensorrt_source(m, int8, Precision.INT8)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_TRT, reason="TensorRT is not installed (CPU-only machine)")
def test_tensorrt_build_and_run_matches_onnxruntime(tiny_manifest, tmp_path):
    from server.runtime.fingerprint import device_fingerprint
    from server.runtime.onnxruntime_backend import OnnxRuntimeBackend
    from server.runtime.tensorrt_backend import TensorRTBackend
    from server.runtime.tensorrt_builder import BuildOptions, build_engine

    m = load_manifest(tiny_manifest)
    v = m.variant()
    want = device_fingerprint("fp32", v.sha256, 4)
    options = BuildOptions("fp32", 4, timing_cache=str(tmp_path / "t.cache"))
    engine = build_engine(m.path_of(v), tmp_path / "m.engine", options, want)
    trt_b = TensorRTBackend(engine, want, 4)
    ort_b = OnnxRuntimeBackend(m.path_of(v), max_batch=4)
    trt_b.activate()
    ort_b.activate()
    x = np.random.default_rng(0).random((3, 3, 48, 64), dtype=np.float32)
    np.testing.assert_allclose(trt_b.infer(x)["output"], ort_b.infer(x)["output"], atol=1e-3)
    trt_b.deactivate()


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_TRT, reason="TensorRT is not installed (CPU-only machine)")
def test_tensorrt_builds_a_dynamic_size_model_at_the_manifest_size(tmp_path):
    import onnx

    from perception.manifest import sha256_file
    from server.runtime.fingerprint import device_fingerprint
    from server.runtime.onnxruntime_backend import OnnxRuntimeBackend
    from server.runtime.tensorrt_backend import TensorRTBackend
    from server.runtime.tensorrt_builder import BuildOptions, build_engine
    from tests.tiny_model import make_tiny_onnx

    fixed = tmp_path / "fixed.onnx"
    make_tiny_onnx(fixed, 64, 48)
    model = onnx.load(str(fixed))
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_param, dims[3].dim_param = "height", "width"  # as an export for --input-size leaves them
    dynamic = tmp_path / "dynamic.onnx"
    onnx.save(model, str(dynamic))
    want = device_fingerprint("fp32", sha256_file(dynamic), 2)
    engine = build_engine(dynamic, tmp_path / "m.engine", BuildOptions("fp32", 2, input_height=48, input_width=64),
                          want)
    trt_b = TensorRTBackend(engine, want, 2)
    ort_b = OnnxRuntimeBackend(fixed, max_batch=2)
    trt_b.activate()
    ort_b.activate()
    x = np.random.default_rng(0).random((2, 3, 48, 64), dtype=np.float32)
    np.testing.assert_allclose(trt_b.infer(x)["output"], ort_b.infer(x)["output"], atol=1e-3)
    trt_b.deactivate()


def _tiny_onnx_pair(tmp_path, batch: int):
    """The tiny model exported with a dynamic batch, and the same with a fixed ``batch``."""
    import onnx

    from tests.tiny_model import make_tiny_onnx

    dyn = tmp_path / "dyn.onnx"
    make_tiny_onnx(dyn)
    model = onnx.load(str(dyn))
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = batch
    fixed = tmp_path / "fixed.onnx"
    onnx.save(model, str(fixed))
    return dyn, fixed


def test_fixed_batch_export_runs_in_padded_chunks(tmp_path):
    from server.runtime.onnxruntime_backend import OnnxRuntimeBackend

    dyn, fixed = _tiny_onnx_pair(tmp_path, 4)
    a, b = OnnxRuntimeBackend(dyn, intra_op_threads=1), OnnxRuntimeBackend(fixed, intra_op_threads=1, max_batch=8)
    a.activate()
    b.activate()
    assert b.max_batch == 4  # the engine's batch range wins over the configured one
    x = np.random.default_rng(0).random((6, 3, 48, 64), dtype=np.float32)
    np.testing.assert_allclose(b.infer(x)["output"], a.infer(x)["output"], rtol=1e-5, atol=1e-5)
    assert b.infer(x[:1])["output"].shape[0] == 1


def test_a_run_of_several_chunks_ends_on_its_session_when_deactivated_midway(tmp_path):
    """A health recovery replaces a backend and deactivates the old one while a batch may still
    run on it: a fixed-batch export's run of several chunks used to fail on the next chunk
    ("'NoneType' object has no attribute 'run'")."""
    from server.runtime.onnxruntime_backend import OnnxRuntimeBackend

    _, fixed = _tiny_onnx_pair(tmp_path, 2)
    b = OnnxRuntimeBackend(fixed, intra_op_threads=1, max_batch=2)
    b.activate()
    x = np.random.default_rng(0).random((5, 3, 48, 64), dtype=np.float32)
    expected = b.infer(x)["output"]
    chunks = 0
    session = b._session

    class Deactivating:
        """The real session; the backend is deactivated once the first chunk has run on it."""

        def run(self, names, feeds):
            nonlocal chunks
            out = session.run(names, feeds)
            chunks += 1
            if chunks == 1:
                b.deactivate()
            return out

    b._session = Deactivating()
    np.testing.assert_array_equal(b.infer(x)["output"], expected)
    assert chunks == 3 and b._session is None
    with pytest.raises(ModelError, match="not activated"):
        b.infer(x)


def test_fixed_batch_chunks_with_ragged_outputs_are_zero_padded() -> None:
    """A post-NMS batch-1 model answers (1, K, 4) with a different K per image; a batch of
    several runs chunk by chunk and the answers are padded to the largest K (num_dets says
    which rows are real)."""
    from server.runtime.onnxruntime_backend import concat_ragged

    a, b = np.ones((1, 2, 4), np.float32), np.full((1, 3, 4), 2.0, np.float32)
    out = concat_ragged([a, b])
    assert out.shape == (2, 3, 4)
    np.testing.assert_array_equal(out[0, :2], a[0])
    np.testing.assert_array_equal(out[0, 2], 0.0)
    np.testing.assert_array_equal(out[1], b[0])
    same = concat_ragged([a, a])
    assert same.shape == (2, 2, 4)


def test_the_cores_go_to_one_thread_batches_unless_told_otherwise() -> None:
    from server.runtime.settings import resolve_arrangement, usable_cores

    assert resolve_arrangement(0, 0, 2) == (1, 2)  # one one-thread batch per core
    assert resolve_arrangement(0, 0, 8) == (1, 8)
    assert resolve_arrangement(2, 0, 2) == (2, 1)  # the threads given fill the cores
    assert resolve_arrangement(3, 0, 2) == (3, 1)  # never zero workers
    assert resolve_arrangement(0, 2, 8) == (4, 2)
    assert resolve_arrangement(0, 4, 2) == (1, 4)
    assert resolve_arrangement(2, 3, 2) == (2, 3)  # both given: as given
    assert resolve_arrangement(0, 0, 8, on_cpu=False) == (8, 1)  # a GPU: one batch at a time
    assert resolve_arrangement(2, 0, 8, on_cpu=False) == (2, 1)
    assert resolve_arrangement(0, 2, 8, on_cpu=False) == (8, 2)
    assert usable_cores() >= 1


def _cgroup_tree(tmp_path, own: str, quotas: dict[str, str]):
    """A fake cgroup v2 mount (``root``) and membership file (``own``: the process's cgroup path)."""
    root = tmp_path / "cgroup"
    root.mkdir(exist_ok=True)
    for rel, text in quotas.items():
        d = root / rel.strip("/") if rel.strip("/") else root
        d.mkdir(parents=True, exist_ok=True)
        (d / "cpu.max").write_text(text)
    (root / own.strip("/")).mkdir(parents=True, exist_ok=True)
    membership = tmp_path / "self_cgroup"
    membership.write_text(f"0::{own}\n")
    return str(root), str(membership)


@pytest.fixture()
def eight_cores(monkeypatch):
    import os

    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(8)), raising=False)


SERVICE = "/system.slice/perception.service"


@pytest.mark.parametrize(
    ("own", "quotas", "cores"),
    [
        # a container with its own cgroup namespace: its limit at the root of its mount
        ("/", {"/": "100000 100000\n"}, 1),
        ("/", {"/": "150000 100000\n"}, 2),  # 1.5 CPUs, rounded up
        # a systemd service (CPUQuota=150%): the quota is in its own cgroup, the root has none
        (SERVICE, {SERVICE: "150000 100000\n"}, 2),
        # the slice above it is lower
        (SERVICE, {"/system.slice": "100000 100000\n", SERVICE: "max 100000\n"}, 1),
        # the leaf is lower than its parent: the lowest binds
        (SERVICE, {"/system.slice": "400000 100000\n", SERVICE: "250000 100000\n"}, 3),
        # "max" everywhere, and no cpu.max anywhere: the affinity alone
        (SERVICE, {"/": "max 100000\n", "/system.slice": "max 100000\n", SERVICE: "max 100000\n"}, 8),
        (SERVICE, {}, 8),
        ("/", {"/": "garbage\n"}, 8),
    ],
)
def test_a_cgroup_cpu_quota_caps_the_cores(tmp_path, eight_cores, own, quotas, cores) -> None:
    from server.runtime.settings import usable_cores

    root, membership = _cgroup_tree(tmp_path, own, quotas)
    assert usable_cores(root, membership) == cores


def test_no_cgroup_v2_membership_leaves_the_affinity(tmp_path, eight_cores) -> None:
    """cgroup v1 (no ``0::`` line) or no /proc: only a quota at the mount's root would count."""
    from server.runtime.settings import usable_cores

    root = tmp_path / "cgroup"
    (root / "system.slice").mkdir(parents=True)
    (root / "system.slice" / "cpu.max").write_text("100000 100000\n")
    v1 = tmp_path / "self_cgroup"
    v1.write_text("4:cpu,cpuacct:/system.slice\n")
    assert usable_cores(str(root), str(v1)) == 8
    assert usable_cores(str(root), str(tmp_path / "absent")) == 8
    (root / "cpu.max").write_text("200000 100000\n")
    assert usable_cores(str(root), str(v1)) == 2


def test_tensorrt_deactivate_does_not_wait_for_ever_behind_a_hung_batch(monkeypatch, caplog):
    """A batch hung in the driver holds the inference lock; deactivate (a swap, a recovery, the
    server's shutdown) gives up after DEACTIVATE_WAIT_S, leaving the GPU memory allocated,
    instead of hanging with it. No GPU needed: the lock is held as a hung batch would hold it."""
    import threading
    import time

    from server.runtime import tensorrt_backend as tb

    monkeypatch.setattr(tb, "DEACTIVATE_WAIT_S", 0.2)
    backend = tb.TensorRTBackend("model.engine", None)
    backend._engine = object()  # type: ignore[assignment]  # "activated": deactivate has work to do
    hung = threading.Event()
    release = threading.Event()

    def batch() -> None:
        with backend._infer_lock:
            hung.set()
            release.wait(10)

    t = threading.Thread(target=batch)
    t.start()
    try:
        assert hung.wait(5)
        start = time.monotonic()
        backend.deactivate()
        assert 0.15 <= time.monotonic() - start < 5
    finally:
        release.set()
        t.join(5)
    assert backend._engine is not None  # nothing was freed under the running batch
    assert any("leaving its GPU memory allocated" in r.getMessage() for r in caplog.records)


def test_a_single_image_export_runs_a_batch_frame_by_frame(tmp_path) -> None:
    """A (3, H, W) model used to refuse every batch but 1, so the gate, INT8 scoring and
    `perception eval`, which batch 4-8 frames, could not score it. Each frame runs alone and
    the outputs are joined; a two-stage export's K differs per frame and is zero-padded."""
    import onnx
    from onnx import TensorProto, helper

    from server.runtime.onnxruntime_backend import OnnxRuntimeBackend

    nodes = [helper.make_node("ReduceSum", ["x"], ["total"], keepdims=0),
             helper.make_node("Reshape", ["x", "flat_shape"], ["flat"]),
             helper.make_node("Greater", ["flat", "half"], ["hit"]),
             helper.make_node("NonZero", ["hit"], ["where"])]  # (1, K): K per frame
    graph = helper.make_graph(
        nodes, "single", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 2, 2])],
        [helper.make_tensor_value_info("total", TensorProto.FLOAT, []),
         helper.make_tensor_value_info("where", TensorProto.INT64, [1, None])],
        [helper.make_tensor("flat_shape", TensorProto.INT64, [1], [12]),
         helper.make_tensor("half", TensorProto.FLOAT, [], [0.5])])
    path = tmp_path / "single.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    backend = OnnxRuntimeBackend(path, intra_op_threads=1, max_batch=8)
    backend.activate()
    try:
        assert backend.max_batch == 1  # the server still batches it one frame at a time
        x = np.zeros((3, 3, 2, 2), np.float32)
        x[0].flat[[1, 5]] = 1.0
        x[2].flat[[0, 2, 7, 11]] = 1.0
        out = backend.infer(x)
        np.testing.assert_allclose(out["total"], [2.0, 0.0, 4.0])
        assert out["where"].shape == (3, 1, 4)
        assert out["where"][0, 0].tolist() == [1, 5, 0, 0] and out["where"][1, 0].tolist() == [0, 0, 0, 0]
        assert out["where"][2, 0].tolist() == [0, 2, 7, 11]
        one = backend.infer(x[:1])
        assert one["total"].shape == (1,) and one["where"].tolist() == [[[1, 5]]]
    finally:
        backend.deactivate()


def test_a_missing_first_choice_backend_is_a_warning(tiny_manifest, caplog):
    """A GPU image whose first backend is not installed served on the CPU with one INFO line:
    found only by its latency. The first choice skipped is a warning; a later one stays INFO."""
    import logging

    m = load_manifest(tiny_manifest)
    cpu = Availability(tensorrt=False, ort_providers=frozenset({"CPUExecutionProvider"}))
    with caplog.at_level(logging.INFO, logger="server.runtime.factory"):
        backend, _ = backend_for(m, preference=("tensorrt", "onnxruntime-cpu", "onnxruntime-cuda"), avail=cpu)
    backend.deactivate()
    levels = {r.getMessage().split(":")[0]: r.levelno for r in caplog.records if "skipped" in r.getMessage()}
    assert levels == {"backend tensorrt skipped": logging.WARNING, "backend onnxruntime-cuda skipped": logging.INFO}


def test_with_a_signing_key_no_engine_cache_inside_the_artifact(tiny_manifest, tmp_path):
    """The manifest's signature does not cover engines cached on the device: the cache must be
    outside the artifact directory, by its real path, and the default (its engines/) is inside."""
    from server.runtime.tensorrt_engines import check_signed_engine_cache

    m = load_manifest(tiny_manifest)
    assert m.root is not None
    (tmp_path / "link").symlink_to(m.root, target_is_directory=True)
    for inside in ("", str(m.root / "engines"), str(m.root), str(m.root / "a" / "b"), str(tmp_path / "link" / "c")):
        with pytest.raises(ModelError, match="inside the artifact directory"):
            check_signed_engine_cache(m, RuntimeSettings(engine_cache_dir=inside))
    check_signed_engine_cache(m, RuntimeSettings(engine_cache_dir=str(tmp_path / "engines")))


def test_a_signed_server_with_tensorrt_refuses_an_engine_cache_in_the_artifact(tiny_manifest, tmp_path, serve,
                                                                               monkeypatch):
    """With --manifest-public-key and the default engine cache, a TensorRT engine put in the
    artifact's engines/ was loaded after a check of its fingerprint alone. A server that may
    run TensorRT now refuses to start so; with a cache outside the artifact it starts."""
    import shutil

    from perception.cli import main as cli
    from tests.server.test_signature import _keys

    art = tmp_path / "art"
    shutil.copytree(tiny_manifest.parent, art)
    priv, pub = _keys(tmp_path, "fleet")
    assert cli(["sign", "--model", str(art), "--key", str(priv)]) == 0
    gpu = Availability(tensorrt=True, ort_providers=frozenset({"CPUExecutionProvider"}))
    monkeypatch.setattr(Availability, "detect", classmethod(lambda cls: gpu))
    with pytest.raises(ModelError, match="inside the artifact directory"):
        serve(model=str(art), manifest_public_key=str(pub))
    run = serve(model=str(art), manifest_public_key=str(pub), engine_cache_dir=str(tmp_path / "cache"))
    assert run.server.backend.name == "onnxruntime-cpu"  # TensorRT tried, and not installed here
