"""Probation's verdicts on batch records fed directly, at given times (the rule is under test,
not this machine's clock): the edges of its limits, its window, and what a reset forgets."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from server.probation import Probation, ProbationLimits

T0 = 1000.0  # when the window starts (time.monotonic() seconds)


def _model(p50_ms: float = 1.0) -> Any:
    """What probation reads of a model: the latency its build recorded."""
    return SimpleNamespace(variant=SimpleNamespace(latency_ms={"p50": p50_ms}))


def _on_probation(baseline_s: float | None = 0.001, model: Any = None, fallback: Any = None,
                  **limits: Any) -> Probation:
    """A model on probation from T0 (60 s), after 20 batches of the served model at ``baseline_s``
    (None: none)."""
    p = Probation(ProbationLimits(**limits))
    for _ in range(20 if baseline_s is not None else 0):
        assert p.record(True, baseline_s or 0.0, T0 - 1) is None
    p.measure_baseline()
    p.start(T0, model or _model(), fallback or _model())
    return p


def _feed(p: Probation, n: int, ok: bool = True, seconds: float = 0.001) -> list[str | None]:
    return [p.record(ok, seconds, T0 + 1) for _ in range(n)]


def test_the_error_rate_is_judged_from_the_minimum_batches_on_and_may_reach_its_limit() -> None:
    p = _on_probation()
    assert _feed(p, 4, ok=False) == [None] * 4  # 100 % failed, but 4 batches are not judged
    assert _feed(p, 1, ok=False) == ["100% of its batches failed in probation (limit 20%)"]
    p = _on_probation()
    assert _feed(p, 1, ok=False) + _feed(p, 4) == [None] * 5  # 1 in 5: at the limit, not over it
    assert _feed(p, 1, ok=False) == ["33% of its batches failed in probation (limit 20%)"]


def test_p99_is_judged_from_the_minimum_latency_batches_on_against_max_2x_or_the_slack() -> None:
    p = _on_probation()  # baseline p99 1 ms: the limit is max(2 ms, 1 ms + 5 ms) = 6 ms
    assert _feed(p, 48) + _feed(p, 1, seconds=0.010) == [None] * 49  # p99 of 49 batches: not judged
    assert _feed(p, 1, seconds=0.010) == ["its inference p99 10.0 ms crossed 6.0 ms in probation"]
    p = _on_probation()
    assert _feed(p, 48) + _feed(p, 2, seconds=0.006) == [None] * 50  # at the limit, not over it


def test_a_median_over_the_limit_fails_from_the_minimum_batches_on() -> None:
    p = _on_probation()
    assert _feed(p, 4, seconds=0.050) == [None] * 4
    assert _feed(p, 1, seconds=0.050) == ["its inference median 50.0 ms crossed the p99 limit 6.0 ms in probation"]


def test_the_limit_scales_with_the_latency_ratio_the_builds_recorded() -> None:
    slower = {"model": _model(3.0), "fallback": _model(1.0)}  # 3 x 1 ms: max(6 ms, 3 ms + 5 ms) = 8 ms
    assert _feed(_on_probation(**slower), 60, seconds=0.0079) == [None] * 60
    assert _feed(_on_probation(**slower), 5, seconds=0.0081) == [None] * 4 + [
        "its inference median 8.1 ms crossed the p99 limit 8.0 ms in probation"]
    faster = {"model": _model(1.0), "fallback": _model(3.0)}  # allowed no less than 1x
    assert _feed(_on_probation(**faster), 5, seconds=0.0061) == [None] * 4 + [
        "its inference median 6.1 ms crossed the p99 limit 6.0 ms in probation"]


def test_a_fixed_p99_limit_needs_no_baseline_and_without_either_latency_is_not_judged() -> None:
    p = _on_probation(baseline_s=None, max_p99_ms=10.0)
    assert _feed(p, 5, seconds=0.011) == [None] * 4 + [
        "its inference median 11.0 ms crossed the p99 limit 10.0 ms in probation"]
    p = _on_probation(baseline_s=None)
    assert _feed(p, 200, seconds=1.0) == [None] * 200


def test_after_100_batches_latency_is_judged_every_16th_batch_the_error_rate_at_every_one() -> None:
    p = _on_probation()
    assert _feed(p, 100) == [None] * 100
    assert _feed(p, 11, seconds=1.0) == [None] * 11  # batches 101-111: p99 over the limit, not judged
    assert _feed(p, 1, seconds=1.0) == ["its inference p99 1000.0 ms crossed 6.0 ms in probation"]  # 112th
    p = _on_probation()
    assert _feed(p, 104) + _feed(p, 26, ok=False) == [None] * 130
    assert _feed(p, 1, ok=False) == ["21% of its batches failed in probation (limit 20%)"]  # 27 / 131


def test_the_window_ends_at_probation_s_and_after_it_batches_are_the_next_baseline() -> None:
    p = _on_probation(probation_s=60.0)
    assert p.on(T0) and p.on(T0 + 59.999) and not p.on(T0 + 60.0)
    assert [p.record(False, 1.0, T0 + 60.0) for _ in range(10)] == [None] * 10  # not on probation: not judged
    assert [p.record(True, 0.004, T0 + 61.0) for _ in range(20)] == [None] * 20
    p.measure_baseline()  # the served model's successful batches: 4 ms (its failures do not count)
    p.start(T0 + 62.0, _model(), _model())
    assert [p.record(True, 0.0091, T0 + 63.0) for _ in range(5)] == [None] * 4 + [
        "its inference median 9.1 ms crossed the p99 limit 9.0 ms in probation"]  # max(2 x 4 ms, 4 ms + 5 ms)


def test_end_forgets_the_window_and_every_batch_counted() -> None:
    p = _on_probation()
    _feed(p, 4, ok=False)
    p.end()
    assert not p.on(T0 + 1) and p.until == 0.0
    assert _feed(p, 5, ok=False) == [None] * 5  # no window: nothing judged
    p.start(T0 + 2, _model(), _model())
    assert _feed(p, 4, ok=False) == [None] * 4  # the 4 failures before the reset do not count
    p.end()
    p.measure_baseline()  # the served model's batches were forgotten too: no latency is judged
    p.start(T0 + 2, _model(), _model())
    assert _feed(p, 200, seconds=1.0) == [None] * 200


def test_a_baseline_is_kept_when_asked_and_no_batch_measured_a_new_one() -> None:
    p = _on_probation()  # judged against 1 ms
    p.end()
    p.measure_baseline(keep=True)  # no batch since: 1 ms still
    p.start(T0 + 1, _model(), _model())
    assert _feed(p, 5, seconds=0.050) == [None] * 4 + [
        "its inference median 50.0 ms crossed the p99 limit 6.0 ms in probation"]
    p.end()
    p.measure_baseline()  # without keep: no latency is judged
    p.start(T0 + 1, _model(), _model())
    assert _feed(p, 5, seconds=0.050) == [None] * 5


def test_only_batches_outside_a_window_make_the_next_baseline() -> None:
    p = _on_probation(probation_s=60.0)  # judged against 1 ms: limit 6 ms
    assert _feed(p, 10, seconds=0.003) == [None] * 10  # the model on probation: not a baseline
    assert [p.record(True, 0.001, T0 + 61.0) for _ in range(20)] == [None] * 20  # served through it
    p.measure_baseline()  # 1 ms, not 3: limit 6 ms again
    p.start(T0 + 62.0, _model(), _model())
    assert [p.record(True, 0.007, T0 + 63.0) for _ in range(5)] == [None] * 4 + [
        "its inference median 7.0 ms crossed the p99 limit 6.0 ms in probation"]


def test_end_forgets_the_served_models_batches() -> None:
    p = _on_probation()
    p.end()
    assert _feed(p, 20, seconds=0.001) == [None] * 20  # no window: these would be the baseline...
    p.end()  # ... but another model is served now (a rollback): they are forgotten
    p.measure_baseline()
    p.start(T0 + 2, _model(), _model())
    assert _feed(p, 200, seconds=1.0) == [None] * 200  # no baseline: latency is not judged


def test_keep_still_measures_a_new_baseline_when_batches_were_counted() -> None:
    p = _on_probation()  # judged against 1 ms
    p.end()
    assert _feed(p, 20, seconds=0.004) == [None] * 20
    p.measure_baseline(keep=True)  # 4 ms now: limit max(8 ms, 9 ms)
    p.start(T0 + 2, _model(), _model())
    assert _feed(p, 5, seconds=0.0085) == [None] * 5  # over the old limit of 6 ms, under 9 ms


def test_failed_batches_count_in_the_error_rate_not_in_the_latency() -> None:
    p = _on_probation()  # limit 6 ms
    assert _feed(p, 50) + _feed(p, 10, ok=False, seconds=1.0) == [None] * 60  # 1 in 6 failed, each 1 s long
