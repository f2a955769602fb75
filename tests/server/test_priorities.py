"""Camera priority classes in the batcher: higher classes served first and shed last, lower
classes delayed but never starved without bound."""

from __future__ import annotations

import time

from server.scheduler import Job, JobStatus, Scheduler
from tests.server.test_scheduler import Recorder, backend, tensor  # noqa: F401  (fixture)


def test_higher_classes_are_served_first(backend) -> None:  # noqa: F811
    rec = Recorder()
    s = Scheduler(backend.infer, max_batch=2, max_wait_s=0.0, queue_size=4, max_pending=64)
    s._accepting = True  # queue everything before the worker starts: the order is the batcher's
    for i in range(2):
        s.submit(Job(f"be{i}", tensor(i), rec.cb(f"be{i}"), priority=0))
    for i in range(2):
        s.submit(Job(f"crit{i}", tensor(10 + i), rec.cb(f"crit{i}"), priority=2))
    s._accepting = False
    s.start()
    rec.wait(4)
    s.stop(2)
    assert set(rec.order[:2]) == {"crit0", "crit1"}, rec.order  # the first batch is the critical one
    assert all(r.status is JobStatus.OK for r in rec.results.values())


def test_overload_sheds_the_lowest_class_to_admit_a_higher_one(backend) -> None:  # noqa: F811
    rec = Recorder()
    s = Scheduler(backend.infer, max_batch=4, max_wait_s=0.0, queue_size=1, max_pending=2)
    s._accepting = True
    s.submit(Job("cabin", tensor(0), rec.cb("cabin"), priority=0))
    s.submit(Job("rear", tensor(1), rec.cb("rear"), priority=1))
    s.submit(Job("front", tensor(2), rec.cb("front"), priority=2))  # full: the cabin frame makes room
    assert rec.results["cabin"].status is JobStatus.SHED and "higher-priority" in rec.results["cabin"].message
    assert s.shed_for_priority == 1 and s.pending == 2
    s._accepting = False
    s.start()
    rec.wait(3)
    s.stop(2)
    assert rec.results["front"].status is JobStatus.OK and rec.results["rear"].status is JobStatus.OK


def test_a_lower_class_waits_at_most_about_its_starvation_time(backend) -> None:  # noqa: F811
    """A best-effort frame queued while critical frames keep arriving is served once it has
    waited long enough to outrank them."""
    rec = Recorder()
    s = Scheduler(backend.infer, max_batch=1, max_wait_s=0.0, queue_size=2, max_pending=64)
    s.starvation_s = 0.2
    s.start()
    s.submit(Job("be", tensor(0), rec.cb("be"), priority=0))
    t0 = time.monotonic()
    i = 0
    while "be" not in rec.results and time.monotonic() - t0 < 5:
        s.submit(Job(f"crit{i % 3}", tensor(i), rec.cb(f"c{i}"), priority=2))
        i += 1
        time.sleep(0.002)
    s.stop(2)
    assert rec.results["be"].status is JobStatus.OK
    assert rec.results["be"].queue_s < 1.0, rec.results["be"].queue_s


def test_a_critical_cameras_whole_queue_joins_the_batch(backend) -> None:  # noqa: F811
    """8 cameras share a batch of 8: a critical camera gets both its queued frames into it, not
    one per round (which capped it at one frame per batch)."""
    rec = Recorder()
    s = Scheduler(backend.infer, max_batch=8, max_wait_s=0.0, queue_size=2, max_pending=64)
    s._accepting = True
    for cam in range(8):
        for i in range(2):
            s.submit(Job(f"cam{cam}", tensor(cam * 2 + i), rec.cb(f"cam{cam}-{i}"), priority=2 if cam == 0 else 0))
    jobs, _ = s._take_batch_locked(time.monotonic())
    names = [j.key for j in jobs]
    assert names.count("cam0") == 2 and len(names) == 8


def test_latency_is_exported_per_priority_class(serve) -> None:
    from tests.server.conftest import jpeg, request

    run = serve(camera_priorities=("front=critical", "cabin=best_effort"))
    reqs = [request(cam, i, jpeg()) for i, cam in enumerate(("front", "cabin", "rear", "front"))]
    assert len(list(run.stub.StreamDetect(iter(reqs), timeout=10))) == 4
    count = run.registry.get_sample_value
    name = "perception_priority_latency_seconds_count"
    assert count(name, {"priority": "critical"}) == 2
    assert count(name, {"priority": "best_effort"}) == 1 and count(name, {"priority": "normal"}) == 1
