"""The rules behind a lossless replay, without a server: reconnecting bounded by time, frames
refused by a draining server kept for re-sending, client statuses apart from the server's,
and a summary that accounts for every frame."""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import pytest

from client.backoff import Backoff
from client.client_status import ClientStatus, Unanswered, is_drain_refusal
from client.config import BackoffConfig
from client.convert import from_response
from client.frames import FrameResult, FrameStatus, SourceFrame
from client.resend_window import Next, ResendWindow
from client.sinks.jsonl import JsonlSink, load_results, read_jsonl
from client.summary import ReplayStats, format_table
from perception.errors import ConfigError, NotReadyError
from perception.v1 import detector_pb2 as pb

STEADY = BackoffConfig(initial_s=1.0, max_s=4.0, multiplier=2.0, jitter=0.0, give_up_after_s=10.0)


def _frame(seq: int) -> SourceFrame:
    return SourceFrame("front", seq, seq * 1_000_000, encoded=b"\xff\xd8")


def _answer(seq: int, status: pb.FrameStatus = pb.FRAME_STATUS_OK, message: str = "") -> FrameResult:
    return from_response(pb.DetectResponse(camera_id="front", sequence=seq, status=status, message=message))


def test_reconnecting_is_bounded_by_time_not_attempts() -> None:
    b = Backoff(STEADY, random.Random(0))
    now, delays = 100.0, []
    while (d := b.next_delay(now)) is not None:
        delays.append(d)
        now += d + 0.5  # each attempt also takes time to fail
    assert delays == [1.0, 2.0, 4.0, 1.5], "the last delay ends at the deadline: one attempt right at it"
    assert now - 100.0 >= STEADY.give_up_after_s and b.attempts == 4
    b.reset()
    assert b.next_delay(now) == 1.0, "an answer starts a new streak with a new deadline"
    forever = Backoff(BackoffConfig(initial_s=1.0, max_s=1.0, give_up_after_s=0.0, max_attempts=0))
    assert all(forever.next_delay(t * 1000.0) is not None for t in range(50)), "0 and 0: never give up"
    both = Backoff(BackoffConfig(initial_s=1.0, max_s=1.0, jitter=0.0, give_up_after_s=100.0, max_attempts=2))
    assert [both.next_delay(t) for t in (0.0, 1.0, 2.0)] == [1.0, 1.0, None], "whichever bound comes first"


def test_default_backoff_gives_up_by_time() -> None:
    c = BackoffConfig()
    assert c.max_attempts == 0 and c.give_up_after_s >= 60.0
    with pytest.raises(ConfigError, match="give_up_after_s"):
        BackoffConfig(give_up_after_s=-1.0)


def test_window_gives_up_after_the_time_bound_and_says_how() -> None:
    w = ResendWindow(2, Backoff(STEADY, random.Random(0)), name="cam")
    w.accept(_frame(0))
    g = w.begin_connection()
    assert g is not None and w.take(g, 0.0) is not None
    now = 0.0
    decisions = []
    while True:
        w.end_connection()
        d = w.after_failure(NotReadyError("server down"), retryable=True, now=now)
        decisions.append(d.next)
        if d.next is not Next.RECONNECT:
            break
        assert w.begin_connection() is not None
        now += d.delay_s
    assert decisions[-1] is Next.GIVE_UP and decisions.count(Next.RECONNECT) == 4
    assert now == pytest.approx(10.0) and w.give_up_note == "gave up after 4 reconnect attempts in 10.0 s"
    assert [f.sequence for f in w.lost] == [0]


def test_an_idle_session_does_not_give_up_by_time() -> None:
    # A camera node that sends now and then: its stream was dropped while nothing waited (the
    # server's idle timeout), again and again. Nothing was lost, so no reconnect is counted,
    # nothing waits for a delay, and the old drops start no clock.
    w = ResendWindow(2, Backoff(STEADY, random.Random(0)), name="cam")
    w.accept(_frame(0))
    g = w.begin_connection()
    assert g is not None and w.take(g, 0.0) is not None and w.answer("front", 0, 0.0) is not None
    for now in (0.0, 100.0, 200.0):
        w.end_connection()
        d = w.after_failure(NotReadyError("dropped"), retryable=True, now=now)
        assert d.next is Next.IDLE and d.delay_s == 0.0
        assert not w.wants_connection, "connected again only for the next frame"
    assert w.reconnects == 0
    w.accept(_frame(1))  # now a frame waits: the clock runs from the next failure
    assert w.wants_connection and w.begin_connection() is not None
    for now in (300.0, 305.0, 309.0):
        w.end_connection()
        assert w.after_failure(NotReadyError("down"), retryable=True, now=now).next is Next.RECONNECT
        assert w.begin_connection() is not None
    w.end_connection()
    assert w.after_failure(NotReadyError("down"), retryable=True, now=310.0).next is Next.GIVE_UP
    assert [f.sequence for f in w.lost] == [1]


def test_a_drain_refusal_is_told_from_an_answer() -> None:
    assert is_drain_refusal(_answer(0, pb.FRAME_STATUS_OVERLOADED, "server is shutting down; reconnect"))
    assert is_drain_refusal(_answer(0, pb.FRAME_STATUS_OVERLOADED,
                                    "the server is not accepting frames (starting or shutting down)"))
    assert not is_drain_refusal(_answer(0, pb.FRAME_STATUS_OVERLOADED, "too many frames pending"))
    assert not is_drain_refusal(_answer(0, pb.FRAME_STATUS_INVALID, "shutting down"))


def test_a_refused_frame_is_resent_first_and_keeps_its_refusal_until_answered() -> None:
    w = ResendWindow(3, Backoff(STEADY, random.Random(0)), name="cam")
    for i in range(3):
        w.accept(_frame(i))
    g = w.begin_connection()
    assert g is not None and [w.take(g, 1.0) for _ in range(3)] == [_frame(0), _frame(1), _frame(2)]
    assert w.answer("front", 0, 1.1) is not None
    assert w.refuse("front", 1, "server is shutting down") == _frame(1)
    assert w.refuse("front", 0, "late") is None, "an answered frame cannot be refused any more"
    assert w.in_flight == 2 and w.refused == 1, "a refused frame is still in flight"
    w.end_connection()
    d = w.after_failure(NotReadyError("UNAVAILABLE: server is shutting down"), retryable=True, now=2.0)
    assert d.next is Next.RECONNECT and d.first_of_streak
    assert w.begin_connection() is not None
    assert [f.sequence for f in w.resend(now=3.0)] == [1, 2]
    a = w.answer("front", 1, 3.2)
    assert a is not None and a.reconnected and w.refusals == {}


def test_a_refusal_does_not_end_a_failure_streak() -> None:
    w = ResendWindow(2, Backoff(STEADY, random.Random(0)), name="cam")
    w.accept(_frame(0))
    g = w.begin_connection()
    assert g is not None and w.take(g, 0.0) is not None
    delays = []
    for now in (0.0, 2.0):
        w.end_connection()
        delays.append(w.after_failure(NotReadyError("down"), True, now).delay_s)
        assert w.begin_connection() is not None
        w.resend(now)
        assert w.refuse("front", 0, "server is shutting down") is not None
    assert delays == [1.0, 2.0], "the backoff kept growing through the refusals"


def test_a_frame_lost_after_a_refusal_remembers_it() -> None:
    w = ResendWindow(2, Backoff(BackoffConfig(max_attempts=1)), name="cam")
    w.accept(_frame(0))
    w.accept(_frame(1))
    g = w.begin_connection()
    assert g is not None and w.take(g, 0.0) is not None and w.take(g, 0.0) is not None
    w.refuse("front", 0, "server is shutting down")
    for _ in range(2):
        w.end_connection()
        w.after_failure(NotReadyError("down"), retryable=True, now=0.0)
        w.begin_connection()
    assert [f.sequence for f in w.lost] == [0, 1]
    assert w.refusals == {("front", 0): "server is shutting down"}
    assert w.give_up_note == "gave up after 1 reconnect attempts in 0.0 s"


def test_client_statuses_are_apart_from_server_statuses() -> None:
    assert not {s.value for s in ClientStatus} & {s.value for s in FrameStatus}
    rec = Unanswered.of(_frame(7), ClientStatus.NOT_SENT, "the replay was interrupted").to_json_dict()
    # A frame of no file (a video's, an MCAP's) carries no file name: a made-up one matched
    # ground truth by name (client.ground_truth).
    assert rec == {"camera_id": "front", "sequence": 7, "capture_timestamp_ns": 7_000_000, "status": "NOT_SENT",
                   "reason": "the replay was interrupted", "detections": []}
    filed = SourceFrame("front", 7, 7_000_000, encoded=b"\xff\xd8", file_name="front/a.jpg")
    assert Unanswered.of(filed, ClientStatus.NOT_SENT, "stopped").to_json_dict()["file_name"] == "front/a.jpg"


def test_jsonl_holds_both_and_load_results_reads_the_answers(tmp_path: Path) -> None:
    path = tmp_path / "o.jsonl"
    sink = JsonlSink(path)
    sink.write(_frame(0), _answer(0))
    sink.write_unanswered(Unanswered.of(_frame(1), ClientStatus.GIVEN_UP, "never answered: server gone"))
    sink.close()
    assert sink.lines == 2 and path.read_text().count("\n") == 2
    assert [r["status"] for _, r in read_jsonl(path)] == ["OK", "GIVEN_UP"]
    assert [(r.sequence, r.status) for r in load_results(path)] == [(0, FrameStatus.OK)]


def test_summary_accounts_for_every_frame() -> None:
    stats = ReplayStats()
    for i in range(3):
        stats.add(_answer(i, pb.FRAME_STATUS_OK if i else pb.FRAME_STATUS_DROPPED_STALE))
    stats.sent("front", 5)
    stats.lost = 2
    stats.unanswered(Unanswered.of(_frame(3), ClientStatus.GIVEN_UP, "gone"))
    stats.unanswered(Unanswered.of(_frame(4), ClientStatus.REFUSED_DRAINING, "refused"))
    for i in range(5, 9):
        stats.unanswered(Unanswered.of(_frame(i), ClientStatus.NOT_SENT, "stopped"))
    s = stats.as_dict()
    assert s["frames_source"] == 9 == s["frames_sent"] + s["frames_not_sent"]
    assert s["frames_sent"] == s["frames_answered"] + s["client_status"]["GIVEN_UP"] + s["client_status"][
        "REFUSED_DRAINING"]
    assert s["client_status"] == {"NOT_SENT": 4, "GIVEN_UP": 1, "REFUSED_DRAINING": 1}
    assert json.loads(json.dumps(s)) == s, "the summary JSON carries plain strings"
    table = format_table(s)
    assert "frames sent 5  answered 3" in table
    assert "frames read 9 = sent 5 + not sent 4; never answered: GIVEN_UP 1, REFUSED_DRAINING 1" in table


def test_latency_percentiles_are_over_a_bounded_window_and_the_summary_says_so() -> None:
    """A --loop or live replay kept every latency (overall, per camera, per stage) for as long
    as it ran. Past the window the percentiles are over its last answers, and the summary says so."""
    stats = ReplayStats(latency_window=4)
    for i in range(3):
        stats.add(dataclasses.replace(_answer(i), latency_ms=1000.0))
    assert "latency_window" not in stats.as_dict(), "a replay within the window is summed up whole"
    for i in range(3, 10):
        stats.add(dataclasses.replace(_answer(i), latency_ms=float(i)))
    s = stats.as_dict()
    assert len(stats.latency_ms) == len(stats.per_camera["front"]["latency"]) == len(stats.stage_ms["total"]) == 4
    assert s["latency_window"] == 4 and s["frames_answered"] == 10
    assert s["latency_ms"] == s["per_camera"]["front"]["latency_ms"] == {"p50": 7.5, "p95": 8.85, "p99": 8.97}
    assert "(over the last 4 answers)" in format_table(s)
