"""Graceful degradation on a real server: sustained shedding (or heat) moves it to a faster
gated variant, calm moves it back; every answer names the variant that produced it."""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from perception.manifest import load_manifest, save_manifest
from tests.server.conftest import jpeg, request, wait_for
from tests.server.test_lifecycle import versioned_artifact


def two_rung_artifact(d: Path, version: str = "1.0.0", seed: int = 0) -> Path:
    """One model file as two gated variants: "accurate" (p50 10 ms) and "fast" (3 ms)."""
    path = versioned_artifact(d, version, seed=seed)
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


def _count_loads(host: Any) -> list[tuple[str, str]]:
    """The (manifest path, variant) of every model ``host`` loads from now on (the real loader)."""
    loads: list[tuple[str, str]] = []
    real = host._loader

    def counted(path: str, variant: str) -> Any:
        loads.append((path, variant))
        return real(path, variant)

    host._loader = counted
    return loads


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


def test_the_first_window_after_a_move_is_the_new_rungs_own(serve: Any, tmp_path: Path) -> None:
    """Frames the old rung shed while the move loaded its successor are not the new rung's: the
    window after a degrade counted them, and the new rung was one overloaded window from the next."""
    run = serve(model=str(two_rung_artifact(tmp_path / "art")), degrade="auto", degrade_window_s=3600.0)
    deg = run.server.degrader
    assert deg is not None
    real = run.server.models._loader

    def loading_under_load(path: str, variant: str) -> Any:
        _overloaded(deg.monitor)  # the old rung sheds while the new one loads
        return real(path, variant)

    run.server.models._loader = loading_under_load
    _overloaded(deg.monitor)
    deg.step()
    _overloaded(deg.monitor)
    assert deg.step() == "degrade"
    _calm(deg.monitor)  # the new rung keeps up
    assert deg.step() == ""
    assert (deg._hot, deg._calm) == (0, 1)


def test_a_change_of_model_while_a_window_is_judged_leaves_that_window_uncounted(serve: Any, tmp_path: Path) -> None:
    """An operator's load landing between the degrader taking its window and judging it: the
    window (the old model's, overloaded) was counted for the model just loaded, one overloaded
    window from degrading it."""
    from perception.v1 import admin_pb2 as apb
    from tests.server.test_lifecycle import TOKEN, admin

    path = two_rung_artifact(tmp_path / "art")
    run = serve(model=str(path), degrade="auto", degrade_window_s=3600.0, admin_port=0, admin_tokens=("adm1n",))
    deg = run.server.degrader
    assert deg is not None
    judged = deg._thermal_hot  # read between taking the window and judging it

    def load_meanwhile() -> bool:
        deg._thermal_hot = judged
        admin(run).LoadModel(apb.LoadModelRequest(manifest_path=str(path), variant="accurate"), metadata=TOKEN,
                             timeout=30)
        return judged()

    deg._thermal_hot = load_meanwhile
    _overloaded(deg.monitor)
    assert deg.step() == ""
    assert deg._hot == 0, "the old model's window was counted for the new one"


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
    assert run.server.models.current.operator_variant == "fast" and get("perception_model_degraded") == 0
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
    loads = _count_loads(host)
    m = load_manifest(path)
    save_manifest(dataclasses.replace(m, version="2.0.0"), path.parent)
    _overloaded(deg.monitor)
    deg.step()
    _overloaded(deg.monitor)
    assert deg.step() == "" and deg.refused == 1 and host.refusals == 1
    assert "now version '2.0.0'" in host.message and host.current.variant.name == "accurate"
    assert loads == [], "refused after a full load (engine, warm-up) instead of from the manifest alone"
    for _ in range(4):
        _overloaded(deg.monitor)
        assert deg.step() == ""
    assert host.refusals == 1, "retried before its back-off"



def _degrade(deg: Any) -> str:
    _overloaded(deg.monitor)
    deg.step()
    _overloaded(deg.monitor)
    return str(deg.step())


def test_rollback_after_a_degrade_and_a_recover_serves_the_operators_previous_version(
        serve: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Serving v1, the operator loads v2; it passes probation; the degrader moves v2 down and
    back up. Rollback serves v1 again: the moves used to take the one rollback slot (Rollback
    served v2's fast variant, and v1 was freed 5 s after the degrade)."""
    from perception.v1 import admin_pb2 as apb
    from server import model_host
    from tests.server.test_lifecycle import TOKEN, admin, freed

    monkeypatch.setattr(model_host, "DROPPED_DEACTIVATE_S", 0.0)
    v1 = two_rung_artifact(tmp_path / "v1", "1.0.0", seed=0)
    v2 = two_rung_artifact(tmp_path / "v2", "2.0.0", seed=3)
    run = serve(model=str(v1), degrade="auto", degrade_window_s=3600.0, admin_port=0, admin_tokens=("adm1n",),
                probation_s=1.0)
    deg, host, get = run.server.degrader, run.server.models, run.registry.get_sample_value
    first = host.current
    admin(run).LoadModel(apb.LoadModelRequest(manifest_path=str(v2)), metadata=TOKEN, timeout=30)
    time.sleep(1.1)  # v2 served through its probation
    v2_accurate = host.current
    assert _degrade(deg) == "degrade" and host.current.variant.name == "fast"
    assert host.previous is first, "the move took the operator's fallback"
    assert not freed(v2_accurate.backend, v2_accurate)  # kept while the move is on probation ...
    assert wait_for(lambda: freed(v2_accurate.backend, v2_accurate))  # ... then freed: the move held
    for _ in range(5):
        _calm(deg.monitor)
        step = deg.step()
    assert step == "recover" and host.current.variant.name == "accurate" and host.current.version == "2.0.0"
    assert host.previous is first
    time.sleep(1.1)
    status = admin(run).Rollback(apb.RollbackRequest(), metadata=TOKEN, timeout=10)
    assert (status.version, status.variant) == ("1.0.0", "accurate"), status
    assert run.stub.Detect(request("front", 0, jpeg()), timeout=10).model_version == "1.0.0"
    assert get("perception_model_degraded") == 0
    status = admin(run).Rollback(apb.RollbackRequest(), metadata=TOKEN, timeout=10)
    assert (status.version, status.variant) == ("2.0.0", "accurate"), status


def test_a_move_loading_while_a_rollback_happens_does_not_undo_it(serve: Any, tmp_path: Path) -> None:
    """The operator rolls v2 back to v1 while the degrader loads v2's fast variant: the move is
    refused (it was computed from v2) and its model freed; it used to swap v2 back in."""
    from perception.v1 import admin_pb2 as apb
    from tests.server.test_lifecycle import TOKEN, admin, freed

    v1 = two_rung_artifact(tmp_path / "v1", "1.0.0", seed=0)
    v2 = two_rung_artifact(tmp_path / "v2", "2.0.0", seed=3)
    run = serve(model=str(v1), degrade="auto", degrade_window_s=3600.0, admin_port=0, admin_tokens=("adm1n",),
                probation_s=600.0)
    deg, host = run.server.degrader, run.server.models
    admin(run).LoadModel(apb.LoadModelRequest(manifest_path=str(v2)), metadata=TOKEN, timeout=30)
    real = host._loader
    loaded: list[Any] = []

    def rolled_back_meanwhile(path: str, variant: str) -> Any:
        model = real(path, variant)
        loaded.append(model)
        admin(run).Rollback(apb.RollbackRequest(), metadata=TOKEN, timeout=10)
        return model

    host._loader = rolled_back_meanwhile
    assert _degrade(deg) == "" and deg.refused == 1
    assert loaded and loaded[0].variant.name == "fast"
    assert host.current.version == "1.0.0" and host.current.variant.name == "accurate", host.message
    assert "changed to" in host.message
    assert freed(loaded[0].backend, loaded[0])  # at once: it never served
    assert run.stub.Detect(request("front", 0, jpeg()), timeout=10).model_version == "1.0.0"


def test_a_probation_rollback_of_a_move_backs_the_degrader_off(serve: Any, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The fast variant fails its probation and is rolled back to the variant it left: the
    degrader waits, as after a refusal, instead of making the same move two windows later (a
    move and its rollback every few windows)."""
    from server import model_host
    from tests.server.test_lifecycle import freed

    monkeypatch.setattr(model_host, "DROPPED_DEACTIVATE_S", 0.0)
    run = serve(model=str(two_rung_artifact(tmp_path / "art")), degrade="auto", degrade_window_s=3600.0,
                probation_s=600.0)
    deg, host, get = run.server.degrader, run.server.models, run.registry.get_sample_value
    accurate = host.current
    assert _degrade(deg) == "degrade"
    fast = host.current
    for _ in range(5):
        host.observe(False, fast, 0.001)  # every batch of the fast variant fails
    assert host.current is accurate and host.rollbacks == 1 and "failed in probation" in host.message
    assert get("perception_model_degraded") == 0
    for _ in range(4):
        _overloaded(deg.monitor)
        assert deg.step() == ""
    assert host.current is accurate and host.swaps == 1 and host.refusals == 0
    assert wait_for(lambda: freed(fast.backend, fast))  # the failed variant is not kept


def test_probations_rollback_goes_to_the_variant_left_even_when_its_time_ran_out_meanwhile(
        serve: Any, tmp_path: Path) -> None:
    """Probation judges a move's variant failed, and its rollback comes a moment later: if the
    probation's time ran out in between, the variant the move left had already been let go, and
    the rollback served the operator's previous model, or, with none, raised and left the
    failing variant serving with its predecessor's engine never freed."""
    run = serve(model=str(two_rung_artifact(tmp_path / "art")), degrade="auto", degrade_window_s=3600.0,
                probation_s=600.0)
    deg, host = run.server.degrader, run.server.models
    accurate = host.current
    assert _degrade(deg) == "degrade" and host.previous is None
    fast = host.current
    host._probation.until = time.monotonic() - 0.001  # judged within it, rolled back just after
    assert host.rollback("failed in probation", expect=fast) is accurate
    assert host.current is accurate and host.rollbacks == 1


class _WatchedLock:
    """A lock that tells (``waited``) when a thread has to wait for it."""

    def __init__(self, waited: threading.Event) -> None:
        self._lock = threading.Lock()
        self._waited = waited

    def __enter__(self) -> None:
        if not self._lock.acquire(blocking=False):
            self._waited.set()
            self._lock.acquire()

    def __exit__(self, *exc: object) -> None:
        self._lock.release()


class _PauseAtBackOff(logging.Handler):
    """Holds the thread logging a back-off (halfway through writing it) until ``go`` is set."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.reached = threading.Event()
        self.go = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if "no move for" in record.getMessage():
            self.reached.set()
            self.go.wait(30)


def test_an_operators_load_during_a_back_off_resets_it_whole(serve: Any, tmp_path: Path) -> None:
    """A refused step backs off on the degrader's thread while an operator's load, on another,
    resets the back-off: the load comes second, so its reset stands. The back-off, halfway
    written when the load's hook ran, used to go on to double the wait the load had just reset
    (the next refusal waited 60 s, not 30)."""
    path = two_rung_artifact(tmp_path / "art")
    run = serve(model=str(path), degrade="auto", degrade_window_s=3600.0)
    deg, host = run.server.degrader, run.server.models
    settled = threading.Event()  # the load's hook ran, or waits for the degrader's lock
    deg._lock = _WatchedLock(settled)
    m = load_manifest(path)
    save_manifest(dataclasses.replace(m, version="2.0.0"), path.parent)  # the step is refused; the operator loads it
    pause = _PauseAtBackOff()
    logging.getLogger("server.degrade").addHandler(pause)
    errors: list[BaseException] = []

    def operators_load() -> None:
        try:
            host.load_and_swap(str(path))
        except BaseException as exc:
            errors.append(exc)
        finally:
            settled.set()

    try:
        _overloaded(deg.monitor)
        deg.step()
        _overloaded(deg.monitor)
        stepping = threading.Thread(target=deg.step)
        stepping.start()
        assert pause.reached.wait(30), "the step was not refused"
        loading = threading.Thread(target=operators_load)
        loading.start()
        assert settled.wait(30)
        pause.go.set()
        stepping.join(30)
        loading.join(30)
    finally:
        pause.go.set()
        logging.getLogger("server.degrade").removeHandler(pause)
    assert not errors, errors
    assert deg.refused == 1 and host.current.version == "2.0.0"
    assert (deg._retry_at, deg._retry_s) == (0.0, deg.policy.retry_s), "the load's reset of the back-off was lost"


def test_no_move_on_a_model_swapped_in_before_its_change_hook_ran(serve: Any, tmp_path: Path) -> None:
    """An operator's load swaps v2 in; until its change hook (which resets the windows) has run,
    the degrader's windows are v1's. A step in between used to degrade v2 on them."""
    path = two_rung_artifact(tmp_path / "art")
    run = serve(model=str(path), degrade="auto", degrade_window_s=3600.0)
    deg, host = run.server.degrader, run.server.models
    hooked, go = threading.Event(), threading.Event()
    heard = deg.model_changed

    def late_hook(model: Any, cause: str) -> None:
        hooked.set()
        assert go.wait(30)
        heard(model, cause)

    deg.model_changed = late_hook
    m = load_manifest(path)
    save_manifest(dataclasses.replace(m, version="2.0.0"), path.parent)
    loading = threading.Thread(target=host.load_and_swap, args=(str(path),))
    answers: list[str] = []
    try:
        _overloaded(deg.monitor)
        assert deg.step() == ""  # one overloaded window of v1's: two make a move
        loading.start()
        assert hooked.wait(30) and host.current.version == "2.0.0"
        _overloaded(deg.monitor)
        stepping = threading.Thread(target=lambda: answers.append(deg.step()))
        stepping.start()
        stepping.join(10)
        assert not stepping.is_alive() and answers == [""], "v2 was moved on v1's windows"
    finally:
        go.set()
        loading.join(30)
    assert host.current.version == "2.0.0" and host.current.variant.name == host.current.operator_variant
    assert _degrade(deg) == "degrade"  # once the hook ran, v2's own windows count


def _three_rungs(d: Path, mid_passed: bool = True) -> Path:
    """accurate (10 ms), mid (6 ms; its gate failed unless ``mid_passed``), fast (3 ms)."""
    path = two_rung_artifact(d)
    m = load_manifest(path)
    accurate, fast = m.variants
    mid = dataclasses.replace(fast, name="mid", latency_ms={"p50": 6.0},
                              gate={"passed": mid_passed, "reason": "" if mid_passed else "accuracy"})
    ver = m.verification
    assert ver is not None
    ver = dataclasses.replace(ver, expected={**ver.expected, "mid": ver.expected["fast"]})
    save_manifest(dataclasses.replace(m, variants=(accurate, mid, fast), verification=ver), d)
    return path


def test_recovery_stops_at_the_operators_variant_whatever_its_gate(serve: Any, tmp_path: Path) -> None:
    """The operator serves "mid", whose gate failed (named, a server serves it). It was left off
    the ladder: after a degrade, recovery climbed to "accurate", the slowest of all, and the
    degraded gauge read 1 while a slower model than the operator's served."""
    run = serve(model=str(_three_rungs(tmp_path / "art", mid_passed=False)), variant="mid", degrade="auto",
                degrade_window_s=3600.0, probation_s=0.0)
    deg, host, get = run.server.degrader, run.server.models, run.registry.get_sample_value
    assert _degrade(deg) == "degrade" and host.current.variant.name == "fast"
    assert host.state == "degraded"  # the admin service's GetModelStatus said "serving"
    moves = []
    for _ in range(12):
        _calm(deg.monitor)
        moves.append(deg.step())
    assert [m for m in moves if m] == ["recover"] and host.current.variant.name == "mid"
    assert get("perception_model_degraded") == 0 and host.state == "serving"


def test_a_recover_the_load_undoes_is_not_tried_again_at_once(serve: Any, tmp_path: Path) -> None:
    """A load the fast variant keeps up with and the accurate one does not: degrade, five calm
    windows, recover, two hot windows, degrade, and so on for ever (11 moves in 40 windows), each
    move a load, warm-up and verification on a CPU already overloaded."""
    run = serve(model=str(two_rung_artifact(tmp_path / "art")), degrade="auto", degrade_window_s=3600.0,
                probation_s=0.0)
    deg, host = run.server.degrader, run.server.models
    moves = []
    for _ in range(40):
        (_overloaded if host.current.variant.name == "accurate" else _calm)(deg.monitor)
        moved = deg.step()
        if moved:
            moves.append(moved)
    assert moves == ["degrade", "recover", "degrade"], moves  # then no recover for retry_s (30 s)
    assert host.current.variant.name == "fast"


def test_an_idle_server_recovers(serve: Any, tmp_path: Path) -> None:
    """Windows with fewer than min_frames frames said nothing: a server that went idle after a
    degrade stayed degraded, its degraded alert firing on an idle vehicle."""
    run = serve(model=str(two_rung_artifact(tmp_path / "art")), degrade="auto", degrade_window_s=3600.0,
                probation_s=0.0)
    deg, host = run.server.degrader, run.server.models
    assert _degrade(deg) == "degrade"
    for _ in range(6):  # a few frames shed in a quiet window: no calm one
        deg.monitor.answered()
        deg.monitor.dropped("stale")
        assert deg.step() == ""
    moved = []
    for _ in range(5):
        for _ in range(3):
            deg.monitor.answered()
        moved.append(deg.step())
    assert moved == [""] * 4 + ["recover"] and host.current.variant.name == "accurate"


def test_a_p99_budget_recovers_when_the_rung_above_would_keep_it(serve: Any, tmp_path: Path) -> None:
    """Calm meant p99 under half the budget: a model idling at 30 ms end to end under a 50 ms
    budget never recovered. The rung above adds its measured 7 ms (10 - 3): 37 ms keeps it."""
    run = serve(model=str(two_rung_artifact(tmp_path / "art")), degrade="auto", degrade_window_s=3600.0,
                probation_s=0.0, degrade_p99_budget_ms=50.0)
    deg, host = run.server.degrader, run.server.models

    def window(p99_s: float) -> str:
        for _ in range(30):
            deg.monitor.answered()
            deg.monitor.latency(p99_s)
        return deg.step()

    window(0.08)
    assert window(0.08) == "degrade"
    assert [window(0.045) for _ in range(8)] == [""] * 8  # 45 + 7 ms would not keep the budget
    assert [window(0.03) for _ in range(5)][-1] == "recover" and host.current.variant.name == "accurate"
