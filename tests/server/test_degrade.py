"""Graceful degradation on a real server: sustained shedding (or heat) moves it to a faster
gated variant, calm moves it back; every answer names the variant that produced it."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from perception.manifest import load_manifest, save_manifest
from tests.server.conftest import jpeg, request
from tests.server.test_lifecycle import versioned_artifact


def two_rung_artifact(d: Path) -> Path:
    """One model file as two gated variants: "accurate" (p50 10 ms) and "fast" (3 ms)."""
    path = versioned_artifact(d, "1.0.0", seed=0)
    m = load_manifest(path)
    base = m.variant()
    accurate = dataclasses.replace(base, name="accurate", latency_ms={"p50": 10.0, "min": 9.0})
    fast = dataclasses.replace(base, name="fast", latency_ms={"p50": 3.0, "min": 2.5}, parent="accurate")
    ver = m.verification
    assert ver is not None
    ver = dataclasses.replace(ver, expected={"accurate": ver.expected[base.name], "fast": ver.expected[base.name]})
    save_manifest(dataclasses.replace(m, variants=(accurate, fast), default_variant="accurate", verification=ver), d)
    return path


def _overloaded(monitor: Any, dropped: int = 30, answered: int = 5) -> None:
    for _ in range(dropped):
        monitor.dropped("overloaded")
    for _ in range(answered):
        monitor.answered()


def _calm(monitor: Any) -> None:
    for _ in range(30):
        monitor.answered()
        monitor.latency(0.01)


def test_degrades_under_sustained_load_and_recovers_with_hysteresis(serve: Any, tmp_path: Path) -> None:
    run = serve(model=str(two_rung_artifact(tmp_path / "art")), degrade="auto", degrade_window_s=3600.0)
    deg = run.server.degrader
    assert deg is not None and run.server.models.current.variant.name == "accurate"
    _overloaded(deg.monitor)
    assert deg.step() == ""  # one overloaded window is not sustained load
    _overloaded(deg.monitor)
    assert deg.step() == "degrade"
    assert run.stub.Detect(request("front", 0, jpeg()), timeout=10).model_variant == "fast"
    for _ in range(4):
        _calm(deg.monitor)
        assert deg.step() == ""  # hysteresis: not back up before five calm windows
    _calm(deg.monitor)
    assert deg.step() == "recover"
    assert run.stub.Detect(request("front", 1, jpeg()), timeout=10).model_variant == "accurate"
    _calm(deg.monitor)
    assert deg.step() == ""  # never above the configured variant
    get = run.registry.get_sample_value
    assert get("perception_model_lifecycle_events_total", {"event": "degrade"}) == 1
    assert get("perception_model_lifecycle_events_total", {"event": "recover"}) == 1
    assert get("perception_model_degraded") == 0


def test_a_thermal_signal_drives_the_same_decision(serve: Any, tmp_path: Path) -> None:
    zone = tmp_path / "temp"
    zone.write_text("91000\n")
    run = serve(model=str(two_rung_artifact(tmp_path / "art")), degrade="auto", degrade_window_s=3600.0,
                thermal_path=str(zone), thermal_limit=85000.0)
    deg = run.server.degrader
    deg.step()
    assert deg.step() == "degrade"  # no frames at all: the heat alone decides
    assert run.registry.get_sample_value("perception_model_degraded") == 1


def test_a_heavy_overload_skips_rungs_a_light_one_does_not(serve: Any, tmp_path: Path) -> None:
    """Three rungs (10, 8 and 3 ms): shedding 10 % asks for 9 ms, the next rung; shedding 86 %
    asks for 1.4 ms, which only the fastest comes near."""
    path = two_rung_artifact(tmp_path / "art")
    m = load_manifest(path)
    accurate, fast = m.variants
    middle = dataclasses.replace(fast, name="middle", latency_ms={"p50": 8.0, "min": 7.5})
    ver = m.verification
    assert ver is not None
    ver = dataclasses.replace(ver, expected={**ver.expected, "middle": ver.expected["fast"]})
    save_manifest(dataclasses.replace(m, variants=(accurate, middle, fast), verification=ver), tmp_path / "art")
    run = serve(model=str(path), degrade="auto", degrade_window_s=3600.0)
    deg = run.server.degrader
    assert deg is not None
    for _ in range(2):
        _overloaded(deg.monitor, dropped=3, answered=27)
        step = deg.step()
    assert step == "degrade" and run.server.models.current.variant.name == "middle"
    for _ in range(5):
        _calm(deg.monitor)
        step = deg.step()
    assert step == "recover" and run.server.models.current.variant.name == "accurate"
    for _ in range(2):
        _overloaded(deg.monitor)
        step = deg.step()
    assert step == "degrade" and run.server.models.current.variant.name == "fast"


def test_the_rung_asked_for_counts_only_the_inference_share_of_the_work(tmp_path: Path) -> None:
    """Rungs of 10, 8 and 3 ms. Shedding 10 % with inference all of the work asks for 9 ms (the
    8 ms rung); with inference a quarter of it (decoding the rest, on the same cores) inference
    has to fall by 40 %, to 6 ms (the 3 ms rung)."""
    from server.degrade import LoadMonitor, _down_to

    m = load_manifest(two_rung_artifact(tmp_path / "art"))
    accurate, fast = m.variants
    rungs = [accurate, dataclasses.replace(fast, name="middle", latency_ms={"p50": 8.0}), fast]
    assert _down_to(rungs, 0, 0.10) == 1
    assert _down_to(rungs, 0, 0.10, inference_share=0.25) == 2
    assert _down_to(rungs, 0, 0.30, inference_share=0.25) == 2  # more than inference could give: the fastest

    monitor = LoadMonitor()
    _overloaded(monitor, dropped=3, answered=27)
    assert monitor.take().inference_share == 1.0  # nothing measured: inference is all there is
    for _ in range(8):
        monitor.work("preprocess", 0.006)
    monitor.work("inference", 0.008)  # one batch of 4: 2 ms a frame against 6 ms of pre-processing
    monitor.batch(4)
    _overloaded(monitor, dropped=3, answered=27)
    window = monitor.take()
    assert window.frames == 30 and abs(window.shed - 0.1) < 1e-9 and abs(window.inference_share - 0.25) < 1e-9
    assert monitor.take().inference_share == 1.0  # the window was reset


def test_an_operators_load_sets_the_variant_to_come_back_to(serve: Any, tmp_path: Path) -> None:
    """An admin load of the fast variant is the operator's choice: calm windows do not climb
    back to the variant the server started with (they used to), and a rollback sets the
    degraded gauge from what is then served."""
    from perception.v1 import admin_pb2 as apb
    from tests.server.test_lifecycle import TOKEN, admin

    path = two_rung_artifact(tmp_path / "art")
    run = serve(model=str(path), degrade="auto", degrade_window_s=3600.0, admin_port=0, admin_tokens=("adm1n",))
    deg, get = run.server.degrader, run.registry.get_sample_value
    admin(run).LoadModel(apb.LoadModelRequest(manifest_path=str(path), variant="fast"), metadata=TOKEN, timeout=30)
    assert deg.top == "fast" and get("perception_model_degraded") == 0
    for _ in range(6):
        _calm(deg.monitor)
        assert deg.step() == ""
    assert run.server.models.current.variant.name == "fast"
    admin(run).Rollback(apb.RollbackRequest(), metadata=TOKEN, timeout=10)
    assert run.server.models.current.variant.name == "accurate" and get("perception_model_degraded") == 0
    _overloaded(deg.monitor)
    deg.step()
    _overloaded(deg.monitor)
    assert deg.step() == "degrade" and get("perception_model_degraded") == 1
    admin(run).Rollback(apb.RollbackRequest(), metadata=TOKEN, timeout=10)
    assert get("perception_model_degraded") == 0  # it used to stay 1 after any change but a move


def test_a_refused_move_waits_before_the_next_and_never_loads_another_version(serve: Any, tmp_path: Path) -> None:
    """The artifact on disk replaced by another version (a fleet update between its copy and its
    reload): a degrade step must not load it, and a refused step is not retried at every window
    (each try is a load, a warm-up and a verification on a CPU already overloaded)."""
    path = two_rung_artifact(tmp_path / "art")
    run = serve(model=str(path), degrade="auto", degrade_window_s=3600.0)
    deg, host = run.server.degrader, run.server.models
    m = load_manifest(path)
    save_manifest(dataclasses.replace(m, version="2.0.0"), path.parent)
    _overloaded(deg.monitor)
    deg.step()
    _overloaded(deg.monitor)
    assert deg.step() == "" and deg.refused == 1 and host.refusals == 1
    assert "now version '2.0.0'" in host.message and host.current.variant.name == "accurate"
    for _ in range(4):
        _overloaded(deg.monitor)
        assert deg.step() == ""
    assert host.refusals == 1, "retried before its back-off"
