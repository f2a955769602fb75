"""ModelHost with real tiny models: a dropped model is freed when its last run ends, never under
one (nor a health recovery's engine given to it meanwhile); change hooks are called outside the
host's locks, in the order of the changes, and the caller of a change returns after its own."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from numpy.typing import NDArray

from perception.errors import ModelError
from perception.layouts import TensorInfo
from perception.manifest import Manifest
from perception.pipeline import FramePipeline
from server import model_host
from server.model_host import LifecycleLimits, ModelHost
from server.runtime.base import Backend
from server.runtime.factory import RuntimeSettings, backend_for
from server.served_model import ModelUses, ServedModel, load_served_model
from tests.tiny_model import make_tiny_artifact


class _HeldBackend:
    """A real backend whose runs wait for ``go`` before they run on it: a run as long as a test
    needs. Records when it is freed."""

    def __init__(self, inner: Backend) -> None:
        self.inner = inner
        self.name = inner.name
        self.running, self.go, self.freed = threading.Event(), threading.Event(), threading.Event()

    @property
    def max_batch(self) -> int:
        return self.inner.max_batch

    @property
    def outputs(self) -> tuple[TensorInfo, ...]:
        return self.inner.outputs

    def activate(self) -> None:
        self.inner.activate()

    def infer(self, batch: NDArray[np.float32]) -> dict[str, NDArray[Any]]:
        self.running.set()
        assert self.go.wait(30)
        return self.inner.infer(batch)

    def deactivate(self) -> None:
        self.freed.set()
        self.inner.deactivate()


@pytest.fixture
def load(tmp_path: Path) -> Any:
    """() -> a newly loaded real tiny model (each call its own engine)."""
    manifest_path = make_tiny_artifact(tmp_path / "tiny")

    def make(m: Manifest, v: str) -> tuple[Backend, Any]:
        return backend_for(m, v, RuntimeSettings(threads=1), preference=("onnxruntime-cpu",))

    def one() -> ServedModel:
        return load_served_model(str(manifest_path), "", make, FramePipeline.from_manifest,
                                 lambda b, p, n: None, 1)

    return one


def _batch(model: ServedModel) -> NDArray[np.float32]:
    spec = model.pipeline.spec
    return np.zeros((1, 3, spec.input_height, spec.input_width), np.float32)


def _host(first: ServedModel, **kw: Any) -> ModelHost:
    return ModelHost(first, lambda path, variant: first, LifecycleLimits(probation_s=0.0), **kw)


def _start_run(model: ServedModel, held: _HeldBackend, outcome: list[Any]) -> threading.Thread:
    """A batch of ``model`` running on a thread, waiting on ``held`` (its backend) for ``go``;
    its result, or its exception, goes to ``outcome``."""

    def run() -> None:
        try:
            outcome.append(model.infer(_batch(model)))
        except Exception as exc:  # recorded: the test's assertion says what went wrong
            outcome.append(exc)

    runner = threading.Thread(target=run, daemon=True)
    runner.start()
    assert held.running.wait(30)
    return runner


# -- a dropped model is freed at its last release ------------------------------------------------


def test_a_dropped_model_is_freed_when_its_last_run_ends_not_under_it(
        load: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A degrade step drops the model a batch is still running on; the grace for its queued
    frames ends (at once here: as if the run outlasted the 5 s) before the run does. The engine
    used to be freed on that timer, under the run; it is now freed when the run ends."""
    monkeypatch.setattr(model_host, "DROPPED_DEACTIVATE_S", 0.0)
    old, new = load(), load()
    held = _HeldBackend(old.backend)
    old.backend = held
    host = _host(old)
    outcome: list[Any] = []
    runner = _start_run(old, held, outcome)
    with caplog.at_level(logging.WARNING, logger="server.model_host"):
        host.swap_in(new, probation=False, cause="degrade")
        assert not host.holds(old)
        deadline = time.monotonic() + 10
        while not held.freed.is_set() and "still hold it" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.01)  # until the grace ended
    assert not held.freed.is_set(), "the engine was freed under a running batch"
    assert "still hold it" in caplog.text
    held.go.set()
    runner.join(30)
    assert outcome and isinstance(outcome[0], dict), outcome
    assert held.freed.is_set() and old.uses.freed, "the engine was not freed when its last run ended"
    with pytest.raises(ModelError, match="swapped out"):
        old.infer(_batch(old))
    assert not new.uses.freed and new.infer(_batch(new))


def test_a_dropped_model_nothing_runs_on_is_freed_when_the_grace_ends(
        load: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(model_host, "DROPPED_DEACTIVATE_S", 0.5)
    old, new = load(), load()
    host = _host(old)
    t0 = time.monotonic()
    host.swap_in(new, probation=False, cause="degrade")
    # The frames prepared for it still have their grace (unless this thread was descheduled past it).
    assert not old.uses.freed or time.monotonic() - t0 >= 0.5
    deadline = time.monotonic() + 10
    while not old.uses.freed and time.monotonic() < deadline:
        time.sleep(0.01)
    assert old.uses.freed and old.uses.held == 0


def test_model_uses_free_once_at_the_last_release_and_reject_misuse() -> None:
    frees: list[int] = []
    uses = ModelUses(lambda: frees.append(1))
    assert uses.acquire() and uses.acquire()
    uses.retire()
    uses.release()
    assert frees == [] and uses.held == 1 and uses.acquire()  # retired, still held: another run may start
    uses.release()
    uses.release()
    assert frees == [1] and uses.freed
    assert not uses.acquire()  # freed: nothing to run on
    uses.retire()
    assert frees == [1]
    with pytest.raises(RuntimeError, match="never acquired"):
        uses.release()


def test_a_failing_free_is_logged_not_raised_into_the_run(caplog: pytest.LogCaptureFixture) -> None:
    def broken() -> None:
        raise OSError("driver gone")

    uses = ModelUses(broken)
    assert uses.acquire()
    uses.retire()
    uses.release()
    assert uses.freed and "freeing a retired model's engine failed" in caplog.text


# -- change hooks outside the lock ---------------------------------------------------------------


def test_a_change_hook_may_call_back_into_the_host(load: Any, caplog: pytest.LogCaptureFixture) -> None:
    """A hook that rolls back the load it is told of: the rollback's own notification used to
    wait for the lock its caller (the hook) held, for ever. It is delivered after the hook returns
    (the hook's call does not wait for it: it would wait for itself), so its failure is logged."""
    a, b = load(), load()
    seen: list[tuple[ServedModel, str]] = []
    host: ModelHost | None = None

    def hook(model: ServedModel, cause: str) -> None:
        seen.append((model, cause))
        if cause == "load":
            assert host is not None
            host.rollback("the hook said so")
        else:
            raise RuntimeError("rollback hook failed")

    host = _host(a, on_change=hook)
    swap = threading.Thread(target=host.swap_in, args=(b,), daemon=True)
    swap.start()
    swap.join(10)
    assert not swap.is_alive(), "a hook calling back into the host deadlocked it"
    assert seen == [(b, "load"), (a, "rollback")] and host.current is a
    assert "the change hook for" in caplog.text and "rollback hook failed" in caplog.text


def test_a_slow_change_hook_delays_no_change_and_the_caller_of_the_next_gets_its_own_hooks_error(
        load: Any) -> None:
    """A hook still busy with a swap: a rollback meanwhile is made at once, and its caller returns
    once its own hook ran, with that hook's exception. It used to return at once, before its hook
    ran, and the exception only reached the log."""
    a, b = load(), load()
    seen: list[tuple[ServedModel, str]] = []
    busy, go = threading.Event(), threading.Event()

    def hook(model: ServedModel, cause: str) -> None:
        seen.append((model, cause))
        if cause == "load":
            busy.set()
            assert go.wait(30)
        elif cause == "rollback":
            raise RuntimeError("rollback hook failed")

    host = _host(a, on_change=hook)
    outcome: list[Any] = []

    def rollback() -> None:
        try:
            outcome.append(host.rollback())
        except Exception as exc:  # recorded: the assertion below says what went wrong
            outcome.append(exc)

    swap = threading.Thread(target=host.swap_in, args=(b,), daemon=True)
    swap.start()
    try:
        assert busy.wait(30)
        back = threading.Thread(target=rollback, daemon=True)
        back.start()
        deadline = time.monotonic() + 10
        while host.current is not a and time.monotonic() < deadline:
            time.sleep(0.01)
        assert host.current is a, "a slow hook of another change delayed the rollback"
        back.join(0.5)
        assert back.is_alive() and not outcome, "the rollback returned before its hook ran"
    finally:
        go.set()
    back.join(30)
    swap.join(30)
    assert seen == [(b, "load"), (a, "rollback")]
    assert len(outcome) == 1 and isinstance(outcome[0], RuntimeError), outcome


def test_a_slow_change_hook_does_not_make_the_next_load_find_one_in_progress(load: Any) -> None:
    """The hook of a load still running: the load is done, so the next one (an admin LoadModel,
    which does not wait) goes ahead. It used to be refused with "another model is being loaded"
    while the hook ran."""
    a, b, c = load(), load(), load()
    loaded = iter([b, c])
    seen: list[tuple[ServedModel, str]] = []
    busy, go = threading.Event(), threading.Event()

    def hook(model: ServedModel, cause: str) -> None:
        seen.append((model, cause))
        if model is b:
            busy.set()
            assert go.wait(30)

    host = ModelHost(a, lambda path, variant: next(loaded), LifecycleLimits(probation_s=0.0), on_change=hook)
    outcome: list[Any] = []

    def second() -> None:
        try:
            outcome.append(host.load_and_swap("c/manifest.json"))
        except Exception as exc:  # recorded: the assertion below says what went wrong
            outcome.append(exc)

    first = threading.Thread(target=host.load_and_swap, args=("b/manifest.json",), daemon=True)
    first.start()
    try:
        assert busy.wait(30)
        later = threading.Thread(target=second, daemon=True)
        later.start()
        deadline = time.monotonic() + 30
        while host.current is not c and not outcome and time.monotonic() < deadline:
            time.sleep(0.01)
        assert host.current is c, f"a slow hook held up the next load: {[str(o) for o in outcome]}"
    finally:
        go.set()
    later.join(30)
    first.join(30)
    assert outcome == [c] and seen == [(b, "load"), (c, "load")]


def test_a_failing_change_hook_reaches_its_caller_and_breaks_no_later_change(load: Any) -> None:
    a, b = load(), load()
    seen: list[str] = []

    def hook(model: ServedModel, cause: str) -> None:
        seen.append(cause)
        if cause == "load":
            raise RuntimeError("hook failed")

    host = _host(a, on_change=hook)
    with pytest.raises(RuntimeError, match="hook failed"):
        host.swap_in(b)
    assert host.current is b
    assert host.rollback() is a and seen == ["load", "rollback"]


def test_a_change_is_delivered_when_what_follows_it_fails(load: Any) -> None:
    """The lifecycle event callback fails after a swap: the hook is still told of it (it used
    to be stranded until the next change, the model info naming the model swapped out)."""
    a, b = load(), load()
    seen: list[tuple[ServedModel, str]] = []

    def on_event(event: str) -> None:
        if event == "swap":
            raise RuntimeError("metrics gone")

    host = _host(a, on_change=lambda model, cause: seen.append((model, cause)), on_event=on_event)
    with pytest.raises(RuntimeError, match="metrics gone"):
        host.swap_in(b)
    assert host.current is b and seen == [(b, "load")]


class _Interrupt(BaseException):
    """Not an Exception: what an interrupt out of a hook is."""


def test_an_interrupt_out_of_a_hook_strands_no_change_queued_behind_it(load: Any) -> None:
    """A hook rolls back the load it is told of, then is interrupted: the rollback queued
    behind it is still delivered before the interrupt goes on (it used to wait for the next
    change), and the interrupt reaches the caller."""
    a, b = load(), load()
    seen: list[tuple[ServedModel, str]] = []
    host: ModelHost | None = None

    def hook(model: ServedModel, cause: str) -> None:
        seen.append((model, cause))
        if cause == "load":
            assert host is not None
            host.rollback("the hook said so")
            raise _Interrupt()

    host = _host(a, on_change=hook)
    with pytest.raises(_Interrupt):
        host.swap_in(b)
    assert host.current is a and seen == [(b, "load"), (a, "rollback")]


# -- a health recovery's engine for a model dropped meanwhile --------------------------------------


def test_a_reloaded_engine_of_a_dropped_model_serves_its_runs_and_is_freed_with_it(
        load: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The served model's engine is reloaded (health recovery) while a degrade step drops the
    model; a run still holds it (as the host's grace lease does for the frames prepared for it:
    here the grace ends at once). The reloaded engine used to be freed on arrival, failing every
    frame still inferred on the model; it now serves them and is freed with the model."""
    monkeypatch.setattr(model_host, "DROPPED_DEACTIVATE_S", 0.0)
    old, new, spare = load(), load(), load()
    held = _HeldBackend(old.backend)
    old.backend = held
    reloaded = _HeldBackend(spare.backend)
    reloaded.go.set()
    host = _host(old)
    outcome: list[Any] = []
    runner = _start_run(old, held, outcome)
    host.swap_in(new, probation=False, cause="degrade")
    assert not host.holds(old)
    assert host.replace_backend(old, reloaded) is held  # the old one is the caller's to free
    assert not reloaded.freed.is_set(), "the reloaded engine was freed while a run held its model"
    assert isinstance(old.infer(_batch(old)), dict)  # a frame of the dropped model, on the reloaded engine
    held.go.set()
    runner.join(30)
    assert outcome and isinstance(outcome[0], dict), outcome
    deadline = time.monotonic() + 10
    while not old.uses.freed and time.monotonic() < deadline:
        time.sleep(0.01)
    assert old.uses.freed and reloaded.freed.is_set(), "the reloaded engine was not freed with its model"
    assert not held.freed.is_set()
    held.deactivate()

    # A model already freed: an engine given to it now is nobody's to keep.
    late = _HeldBackend(load().backend)
    host.replace_backend(old, late)
    assert late.freed.is_set()


def test_a_run_that_took_the_engine_a_reload_replaced_runs_on_the_new_one(load: Any) -> None:
    """A health reload replaced the engine and freed the old one between a run's looking it up
    and running on it: the run found it deactivated and failed its frames ("backend is not
    activated"), one failed batch towards the next reload. It now runs on the new engine."""
    served, spare = load(), load()
    host = _host(served)
    old, new = served.backend, spare.backend

    class _ReloadedUnderTheRun:
        """The engine as a run finds it when the reload lands at that moment: replaced and freed."""

        def __getattr__(self, name: str) -> Any:
            return getattr(old, name)

        def infer(self, batch: NDArray[np.float32]) -> dict[str, NDArray[Any]]:
            assert host.replace_backend(served, new) is self
            old.deactivate()  # as the health recovery frees what it replaced
            return old.infer(batch)

    served.backend = _ReloadedUnderTheRun()
    out = served.infer(_batch(served))
    assert isinstance(out, dict) and served.backend is new
    with pytest.raises(ModelError, match="not activated"):  # a freed engine still fails a run of its own
        old.infer(_batch(served))
