"""The reconnect / re-send rules of a stream session, without a server: ResendWindow driven by
hand and by a seeded random walk of sends, answers, duplicates and dropped connections."""

from __future__ import annotations

import random

import pytest

from client.backoff import Backoff
from client.config import BackoffConfig
from client.frames import SourceFrame
from client.resend_window import Next, ResendWindow
from perception.errors import InvalidInputError, NotReadyError, PerceptionError

FAST = BackoffConfig(initial_s=0.1, max_s=0.4, multiplier=2.0, jitter=0.5, max_attempts=3)


def _frame(seq: int, camera: str = "front") -> SourceFrame:
    return SourceFrame(camera, seq, seq * 1_000_000, encoded=b"\xff\xd8")


def _window(size: int = 2, config: BackoffConfig = FAST, seed: int = 0) -> ResendWindow:
    return ResendWindow(size, Backoff(config, random.Random(seed)), name="cam")


def _send_all(w: ResendWindow, generation: int, now: float) -> list[int]:
    """Move every queued frame to the wire; their sequence numbers."""
    out = []
    while w.has_work(generation):
        f = w.take(generation, now)
        if f is None:
            break
        out.append(f.sequence)
    return out


def test_window_bounds_accepted_frames_and_an_answer_frees_a_slot() -> None:
    w = _window(2)
    w.accept(_frame(0))
    w.accept(_frame(1))
    assert w.in_flight == 2 and not w.can_accept
    with pytest.raises(PerceptionError, match="full"):
        w.accept(_frame(2))
    g = w.begin_connection()
    assert g is not None and _send_all(w, g, now=10.0) == [0, 1]
    assert w.in_flight == 2, "on the wire is still in flight until answered"
    a = w.answer("front", 0, now=10.25)
    assert a is not None and a.frame.sequence == 0 and a.latency_ms == pytest.approx(250.0) and not a.reconnected
    assert w.in_flight == 1 and w.can_accept


def test_a_frame_key_already_in_flight_is_refused() -> None:
    w = _window(3)
    w.accept(_frame(0))
    with pytest.raises(InvalidInputError, match="already in flight"):
        w.accept(_frame(0))  # queued
    g = w.begin_connection()
    assert g is not None and _send_all(w, g, 0.0) == [0]
    with pytest.raises(InvalidInputError, match="already in flight"):
        w.accept(_frame(0))  # on the wire
    w.accept(_frame(0, camera="rear"))  # another camera's frame 0 is another frame
    assert w.answer("front", 0, 1.0) is not None
    w.accept(_frame(0))  # answered: the key is free again
    assert w.in_flight == 2


def test_duplicate_or_unknown_answer_changes_nothing() -> None:
    w = _window(2)
    w.accept(_frame(0))
    g = w.begin_connection()
    assert g is not None and _send_all(w, g, 0.0) == [0]
    assert w.answer("front", 0, 1.0) is not None
    assert w.answer("front", 0, 1.0) is None, "a re-sent frame answered twice is delivered once"
    assert w.answer("rear", 0, 1.0) is None
    assert w.in_flight == 0 and w.can_accept


def test_take_waits_for_work_and_stops_for_an_ended_connection() -> None:
    w = _window(3)
    g = w.begin_connection()
    assert g is not None
    assert not w.has_work(g)
    with pytest.raises(RuntimeError, match="has_work"):
        w.take(g, 0.0)
    w.accept(_frame(0))
    assert w.has_work(g)
    w.end_connection()
    assert w.has_work(g) and w.take(g, 0.0) is None, "an ended connection's request stream must stop"
    g2 = w.begin_connection()
    assert g2 is not None and g2 != g
    assert w.take(g2, 0.0) == _frame(0), "the queued frame goes out on the new connection, once"
    w.accept(_frame(1))
    g3 = w.begin_connection()  # a new connection supersedes the old one even without end_connection
    assert g3 is not None and w.take(g2, 0.0) is None and w.take(g3, 0.0) == _frame(1)


def test_a_connection_is_wanted_only_with_frames_and_a_quiet_one_ends_as_no_failure() -> None:
    w = _window(2)
    assert not w.wants_connection, "nothing to send: no call, no stream slot of the server"
    w.accept(_frame(0))
    assert w.wants_connection
    g = w.begin_connection()
    assert g is not None and _send_all(w, g, 10.0) == [0]
    assert not w.close_if_idle(g, 99.0, 1.0), "a frame on the wire: not quiet, however long it waits"
    assert w.answer("front", 0, 10.0) is not None and not w.wants_connection
    assert not w.close_if_idle(g, 10.9, 1.0), "quiet for less than 1 s"
    assert w.close_if_idle(g, 11.0, 1.0) and w.ended_quietly, "quiet since the answer, for 1 s"
    w.end_connection()
    assert not w.close_if_idle(g, 20.0, 1.0), "an ended connection has no request stream to end"
    w.accept(_frame(1))  # the next frame opens the next connection, quiet from its own start
    g2 = w.begin_connection()
    assert g2 is not None and not w.ended_quietly and _send_all(w, g2, 20.0) == [1]
    w.close_if_idle(g2, 30.0, 1.0)
    w.end_connection()
    assert w.after_failure(NotReadyError("down"), retryable=True, now=30.0).next is Next.RECONNECT
    assert w.reconnects == 1 and w.wants_connection, "frame 1 unanswered: re-sent on a new connection"
    w.close()
    g3 = w.begin_connection()
    assert g3 is not None and w.resend(31.0) == [_frame(1)]
    assert not w.close_if_idle(g3, 99.0, 1.0) and not w.ended_quietly


def test_a_frame_waiting_on_a_half_closed_call_the_server_never_ends_is_stalled() -> None:
    """A frame accepted after the quiet half-close waits for that call to end before it goes on
    the next one; a hung server never ends it, and the frame was on no wire the watchdog looks
    at: it waited for ever."""
    w = _window(4)
    w.accept(_frame(0))
    g = w.begin_connection()
    assert g is not None and _send_all(w, g, 10.0) == [0]
    assert w.answer("front", 0, 10.0) is not None
    assert w.close_if_idle(g, 11.0, 1.0)
    assert not w.stalled(50.0, timeout_s=1.0), "nothing waits: a quiet call may take its time to end"
    w.accept(_frame(1))  # the old call has not ended yet: the frame is queued, on no wire
    assert not w.stalled(11.5, timeout_s=1.0), "a healthy server ends the call within a round trip"
    assert w.stalled(12.1, timeout_s=1.0), "the half-closed call outlived the answer timeout"
    w.end_connection()
    g2 = w.begin_connection()
    assert g2 is not None and not w.stalled(12.2, timeout_s=1.0), "a new connection: the half-close is history"


def test_reconnect_resends_unanswered_frames_first_in_sent_order() -> None:
    w = _window(4)
    for i in range(4):
        w.accept(_frame(i))
    g = w.begin_connection()
    assert g is not None
    taken = [w.take(g, 1.0) for _ in range(3)]
    assert [f.sequence for f in taken if f is not None] == [0, 1, 2]
    assert w.answer("front", 1, 1.5) is not None  # answered out of the middle
    w.end_connection()
    d = w.after_failure(NotReadyError("server gone"), retryable=True)
    assert d.next is Next.RECONNECT and d.first_of_streak and w.reconnects == 1
    g2 = w.begin_connection()
    assert g2 is not None
    assert [f.sequence for f in w.resend(now=5.0)] == [0, 2]
    assert _send_all(w, g2, 5.0) == [3]
    a = w.answer("front", 0, 5.1)
    assert a is not None and a.latency_ms == pytest.approx(100.0), "latency counts from the re-send"
    assert a.reconnected, "the first answer after a failure ends the streak"
    assert not w.stalled(5.1, timeout_s=1.0) and w.stalled(6.2, timeout_s=1.0)


def test_backoff_delays_follow_the_seeded_backoff_then_give_up() -> None:
    w = _window(2, seed=7)
    twin = Backoff(FAST, random.Random(7))
    w.accept(_frame(0))
    g = w.begin_connection()
    assert g is not None and _send_all(w, g, 0.0) == [0]
    w.accept(_frame(1))  # queued behind it
    decisions = []
    for _ in range(FAST.max_attempts):
        w.end_connection()
        decisions.append(w.after_failure(NotReadyError("down"), retryable=True))
        assert w.begin_connection() is not None
    assert [d.next for d in decisions] == [Next.RECONNECT] * 3
    assert [d.delay_s for d in decisions] == [twin.next_delay() for _ in range(3)]
    assert [d.first_of_streak for d in decisions] == [True, False, False]
    w.end_connection()
    final = NotReadyError("still down")
    assert w.after_failure(final, retryable=True).next is Next.GIVE_UP
    assert w.error is final and w.reconnects == 3
    assert [f.sequence for f in w.lost] == [0, 1], "on the wire first, then the queue"
    assert w.in_flight == 0 and w.can_accept, "a blocked sender must wake up"
    with pytest.raises(NotReadyError, match="still down"):
        w.accept(_frame(2))
    assert w.begin_connection() is None
    assert w.after_failure(NotReadyError("late"), retryable=True).next is Next.STOP
    assert w.error is final


def test_an_answer_restarts_the_backoff_streak() -> None:
    w = _window(2, config=BackoffConfig(initial_s=1.0, max_s=8.0, jitter=0.0, max_attempts=3))
    w.accept(_frame(0))
    w.accept(_frame(1))
    g = w.begin_connection()
    assert g is not None and _send_all(w, g, 0.0) == [0, 1]
    delays = []
    for _ in range(2):
        w.end_connection()
        delays.append(w.after_failure(NotReadyError("down"), True).delay_s)
        assert w.begin_connection() is not None
    assert w.answer("front", 0, 1.0) is not None
    w.end_connection()
    d = w.after_failure(NotReadyError("down"), True)
    assert delays == [1.0, 2.0] and d.delay_s == 1.0 and d.first_of_streak and d.next is Next.RECONNECT


def test_a_failure_that_is_not_retryable_gives_up_at_once() -> None:
    w = _window(2)
    w.accept(_frame(0))
    g = w.begin_connection()
    assert g is not None and _send_all(w, g, 0.0) == [0]
    w.end_connection()
    assert w.after_failure(PerceptionError("UNAUTHENTICATED"), retryable=False).next is Next.GIVE_UP
    assert w.reconnects == 0 and [f.sequence for f in w.lost] == [0]


def test_close_finishes_when_drained_and_abort_keeps_the_first_error() -> None:
    w = _window(2)
    w.accept(_frame(0))
    w.close()
    with pytest.raises(PerceptionError, match="after close"):
        w.accept(_frame(1))
    g = w.begin_connection()
    assert g is not None and not w.finished
    assert _send_all(w, g, 0.0) == [0]
    assert w.has_work(g) and w.take(g, 0.0) is None, "closed and drained: the request stream half-closes"
    assert w.answer("front", 0, 0.1) is not None and w.finished
    assert w.begin_connection() is None and w.error is None

    w2 = _window(2)
    w2.accept(_frame(0))
    w2.accept(_frame(1))
    g = w2.begin_connection()
    assert g is not None and w2.take(g, 0.0) is not None
    w2.end_connection()
    gave_up = NotReadyError("gone")
    assert w2.after_failure(gave_up, retryable=False).next is Next.GIVE_UP
    w2.abort(PerceptionError("aborted"))
    assert w2.error is gave_up and w2.closed and [f.sequence for f in w2.lost] == [0, 1]


@pytest.mark.parametrize("seed", range(20))
def test_random_walk_answers_every_frame_once_in_order_or_loses_it(seed: int) -> None:
    """Sends, answers (in order, with duplicates), dropped connections and reconnects in a
    seeded random order: each accepted frame ends exactly once, answered or lost, and each
    camera's answers come in sequence order."""
    rng = random.Random(seed)
    w = _window(rng.randint(1, 4), BackoffConfig(initial_s=0.01, max_s=0.05, max_attempts=rng.choice((0, 2, 5))), seed)
    cams = ("front", "rear")
    next_seq = dict.fromkeys(cams, 0)
    accepted: list[tuple[str, int]] = []
    answered: list[tuple[str, int]] = []
    wire: list[tuple[str, int]] = []  # what the fake server has received on this connection, unanswered
    now = 0.0
    g = w.begin_connection()
    assert g is not None
    for _ in range(400):
        now += rng.random()
        op = rng.random()
        if op < 0.35 and w.can_accept and w.error is None:
            cam = rng.choice(cams)
            w.accept(_frame(next_seq[cam], cam))
            accepted.append((cam, next_seq[cam]))
            next_seq[cam] += 1
        elif op < 0.6 and w.has_work(g):
            f = w.take(g, now)
            if f is not None:
                wire.append((f.camera_id, f.sequence))
        elif op < 0.85 and wire:
            cam, seq = wire.pop(0)  # a stream answers in the order it received
            a = w.answer(cam, seq, now)
            if a is not None:
                answered.append((cam, seq))
            if rng.random() < 0.2:
                assert w.answer(cam, seq, now) is None, "duplicate delivered twice"
        elif op < 0.95 or w.error is not None:
            continue
        else:  # the connection drops: what was on it and unanswered is re-sent on the next one
            wire.clear()
            w.end_connection()
            d = w.after_failure(NotReadyError("dropped"), retryable=rng.random() < 0.9)
            if d.next in (Next.RECONNECT, Next.IDLE):
                new_g = w.begin_connection()
                assert new_g is not None
                g = new_g
                wire.extend((f.camera_id, f.sequence) for f in w.resend(now))
        assert 0 <= w.in_flight <= w.window
    lost = [(f.camera_id, f.sequence) for f in w.lost]
    unanswered = sorted(set(accepted) - set(answered) - set(lost))
    assert len(answered) == len(set(answered)), "a frame answered twice"
    assert not set(answered) & set(lost), "a frame both answered and lost"
    assert len(unanswered) == w.in_flight, "every accepted frame is answered, lost or still in flight"
    for cam in cams:
        seqs = [s for c, s in answered if c == cam]
        assert seqs == sorted(seqs), f"{cam} answered out of order"
