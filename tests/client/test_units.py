"""Small pure pieces: backoff, config validation, target resolution, protobuf conversion."""

from __future__ import annotations

import random
import socket
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest

from client.backoff import Backoff
from client.channels import resolve_targets
from client.config import BackoffConfig, ClientConfig, TlsConfig
from client.convert import RequestOptions, from_response, to_request
from client.frames import DropReason, FrameResult, FrameStatus, RawPixels, SourceFrame, drop_reason
from perception.decode import PixelFormat
from perception.errors import ConfigError
from perception.v1 import detector_pb2 as pb


def test_backoff_grows_is_capped_jittered_and_gives_up() -> None:
    b = Backoff(BackoffConfig(initial_s=0.1, max_s=1.0, multiplier=2.0, jitter=0.5, max_attempts=6), random.Random(1))
    delays = [b.next_delay() for _ in range(6)]
    ceilings = [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    for d, c in zip(delays, ceilings, strict=True):
        assert d is not None and c * 0.5 <= d <= c
    assert len({round(d, 6) for d in delays if d}) == 6  # jittered, not lock-step
    assert b.next_delay() is None
    b.reset()
    assert b.next_delay() is not None


def test_config_validation(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="HOST:PORT"):
        ClientConfig(targets=("localhost",))
    with pytest.raises(ConfigError):
        ClientConfig(targets=("a:1",), window=0)
    with pytest.raises(ConfigError, match="both"):
        TlsConfig(cert=tmp_path / "c.pem")
    with pytest.raises(ConfigError, match="not found"):
        TlsConfig(ca=tmp_path / "missing.pem")
    cfg = ClientConfig(targets=("a:1",), token="s3cret")
    assert cfg.metadata() == (("authorization", "Bearer s3cret"),)
    assert ClientConfig(targets=("a:1",)).metadata() == ()


def test_resolve_targets_expands_a_name_with_several_addresses() -> None:
    def resolver(host: str, port: int, type: int = 0) -> list:  # the getaddrinfo signature
        table = {"edge": ["10.0.0.1", "10.0.0.2", "10.0.0.1"], "one": ["10.0.0.9"], "v6": ["fd00::1", "fd00::2"]}
        if host not in table:
            raise socket.gaierror("no such host")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port)) for ip in table[host]]

    got = resolve_targets(("edge:50051", "one:7", "unknown:5", "v6:1"), resolver)
    assert [a for a, _ in got] == ["10.0.0.1:50051", "10.0.0.2:50051", "one:7", "unknown:5",
                                   "[fd00::1]:1", "[fd00::2]:1"]
    assert got[0][1] == "edge"  # TLS checks the certificate against the name, not the IP


def test_resolve_targets_keeps_localhost_one_target() -> None:
    """localhost is ::1 and 127.0.0.1: one machine, whose server often listens on one of them. A
    channel per address sent every other session to the address nobody listens on."""
    def resolver(host: str, port: int, type: int = 0) -> list:
        ips = {"localhost": ["::1", "127.0.0.1"], "pair": ["10.0.0.1", "::1"], "two": ["127.0.0.1", "127.0.0.2"]}[host]
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port)) for ip in ips]

    assert [a for a, _ in resolve_targets(("localhost:50051",), resolver)] == ["localhost:50051"]
    assert [a for a, _ in resolve_targets(("pair:1",), resolver)] == ["10.0.0.1:1", "[::1]:1"]
    assert [a for a, _ in resolve_targets(("two:1",), resolver)] == ["127.0.0.1:1", "127.0.0.2:1"]


def test_the_pool_follows_a_name_whose_addresses_change() -> None:
    """A name behind which servers come and go (a headless Service through a rolling update) is
    resolved again: new addresses join the rotation, gone ones leave it at once and their
    channels are closed after the retire delay. The addresses fixed at start used to be kept for
    ever, pointing at pods long gone."""
    from client.channels import ChannelPool
    from client.config import ClientConfig

    table = {"edge": ["10.0.0.1", "10.0.0.2"]}

    def resolver(host: str, port: int, type: int = 0) -> list:
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port)) for ip in table[host]]

    pool = ChannelPool(ClientConfig(targets=("edge:50051",)), resolver=resolver, refresh_s=0.0, retire_s=3600.0)
    try:
        assert {pool.next().address for _ in range(4)} == {"10.0.0.1:50051", "10.0.0.2:50051"}
        first = {e.address: e for e in pool.endpoints}
        table["edge"] = ["10.0.0.2", "10.0.0.3"]  # .1 replaced by .3
        assert {pool.next().address for _ in range(4)} == {"10.0.0.2:50051", "10.0.0.3:50051"}
        assert pool.endpoints[0] is first["10.0.0.2:50051"], "a kept address keeps its channel (and streams)"
        gone = first["10.0.0.1:50051"].channel
        gone.unary_unary("/x/y")  # still open: a caller just handed it may use it
        pool._retire_s = 0.0
        pool.next()
        with pytest.raises(ValueError):  # closed once the retire delay passed
            gone.unary_unary("/x/y")(b"", timeout=1)
    finally:
        pool.close()


def test_the_asyncio_pool_closes_retired_channels_and_resolves_off_the_loop() -> None:
    """The asyncio client's pool kept every retired channel open until the client closed (50
    refreshes of a name whose pods changed: 100 channels, their streams never ended), and
    resolved the name on the event loop, stalling every camera for the lookup: its refreshes,
    then its first lookup too, which the constructor made on the loop of whoever built it."""
    import asyncio
    import itertools
    import threading

    import grpc

    from client.channels import ChannelPool
    from client.config import ClientConfig

    lookups = itertools.count()
    threads: list[int] = []  # the thread of each lookup

    def resolver(host: str, port: int, type: int = 0) -> list:
        k = next(lookups)
        threads.append(threading.get_ident())
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (f"10.0.{k}.{i}", port)) for i in (1, 2)]

    async def run() -> tuple[int, int, int]:
        pool = ChannelPool(ClientConfig(targets=("svc:50051",)), aio=True, resolver=resolver, refresh_s=0.0,
                           retire_s=0.0)
        try:
            assert pool.endpoints == [] and not threads  # nothing looked up, no channel made, before use
            await pool.anext()
            first = pool.endpoints[0].channel
            for _ in range(50):
                await pool.anext()  # starts a refresh and returns at once, on the endpoints it has
                await pool._lookup  # the refresh, run to its end
            with pytest.raises(grpc.aio.UsageError):  # closed: a call on it fails at once
                await first.unary_unary("/x/y")(b"", timeout=1)
            return len(pool.endpoints), len(pool._retired), threading.get_ident()
        finally:
            await pool.aclose()

    endpoints, retired, loop_thread = asyncio.run(run())
    assert endpoints == 2 and retired <= 2
    assert len(threads) == 51 and threads.count(loop_thread) == 0  # every lookup off the loop

    async def at_once() -> list[str]:
        """Callers at once on a fresh pool all wait for its one first lookup."""
        pool = ChannelPool(ClientConfig(targets=("svc:50051",)), aio=True, resolver=resolver)
        try:
            return [e.address for e in await asyncio.gather(*(pool.anext() for _ in range(3)))]
        finally:
            await pool.aclose()

    threads.clear()
    got = asyncio.run(at_once())
    assert len(threads) == 1 and set(got) <= {"10.0.51.1:50051", "10.0.51.2:50051"} and len(got) == 3


def test_a_caller_cancelled_during_the_asyncio_pools_first_lookup_does_not_stop_it() -> None:
    """The caller's own await was the lookup: cancelled (a wait_for around a call on a slow DNS,
    a stream closed), it left the pool resolving for ever with no endpoints, and every later
    call waited for good. The lookup is the pool's: the next caller gets its endpoints. A pool
    closed while its first lookup runs makes no channel, and says it is closed."""
    import asyncio
    import time as _time

    from client.channels import ChannelPool
    from client.config import ClientConfig
    from perception.errors import NotReadyError

    lookups: list[str] = []

    def slow(host: str, port: int, type: int = 0) -> list:
        lookups.append(host)
        _time.sleep(0.3)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.1.0.1", port))]

    async def run() -> tuple[str, list[Any]]:
        pool = ChannelPool(ClientConfig(targets=("svc:50051",)), aio=True, resolver=slow)
        try:
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(pool.anext(), 0.05)
            endpoint = await asyncio.wait_for(pool.anext(), 5)
        finally:
            await pool.aclose()
        closed = ChannelPool(ClientConfig(targets=("svc:50051",)), aio=True, resolver=slow)
        waiting = asyncio.ensure_future(closed.anext())
        await asyncio.sleep(0.05)
        await closed.aclose()
        with pytest.raises(NotReadyError, match="closed"):
            await waiting
        return endpoint.address, closed.endpoints

    address, left = asyncio.run(run())
    assert address == "svc:50051" and lookups == ["svc", "svc"] and left == []


def test_request_carries_jpeg_as_is_and_raw_pixels() -> None:
    jpg = b"\xff\xd8\xff\xe0fake"
    opts = RequestOptions(score_threshold=0.3, class_filter=(0, 3))
    req = to_request(SourceFrame("front", 7, 123, encoded=jpg), opts, 250)
    assert req.frame.encoded == jpg and req.frame.sequence == 7 and req.frame.deadline_ms == 250
    assert list(req.options.class_filter) == [0, 3] and req.options.score_threshold == pytest.approx(0.3)
    raw = RawPixels(4, 2, PixelFormat.NV12, bytes(12), row_stride=4)
    req = to_request(SourceFrame("rear", 1, 5, raw=raw))
    assert req.frame.WhichOneof("image") == "raw" and req.frame.raw.format == pb.PIXEL_FORMAT_NV12
    assert req.frame.raw.row_stride == 4 and not req.HasField("options")


def test_response_round_trips_through_jsonl_record() -> None:
    resp = pb.DetectResponse(camera_id="c", sequence=3, capture_timestamp_ns=9, status=pb.FRAME_STATUS_OK,
                             image_width=640, image_height=480,
                             timings=pb.StageTimings(queue_us=5, inference_us=100, total_us=150, batch_size=2))
    d = resp.detections.add()
    d.box.x1, d.box.y1, d.box.x2, d.box.y2 = 1, 2, 30, 40
    d.score, d.class_id, d.class_name = 0.75, 3, "pedestrian"
    r = from_response(resp, latency_ms=1.5)
    assert r.status is FrameStatus.OK and r.class_names == ("pedestrian",)
    np.testing.assert_allclose(r.detections.boxes, [[1, 2, 30, 40]])
    rec = r.to_json_dict()
    assert set(rec) >= {"camera_id", "sequence", "capture_timestamp_ns", "status", "message", "image_width",
                        "image_height", "detections", "timings", "latency_ms"}
    back = FrameResult.from_json_dict(rec)
    assert back.timings.batch_size == 2 and int(back.detections.class_ids[0]) == 3
    stale = from_response(pb.DetectResponse(camera_id="c", sequence=4, status=pb.FRAME_STATUS_DROPPED_STALE))
    assert drop_reason(stale.status) == "stale" and len(stale.detections) == 0


def _answer(seq: int, status: pb.FrameStatus) -> FrameResult:
    return from_response(pb.DetectResponse(camera_id="c", sequence=seq, status=status), latency_ms=2.0)


def test_status_strings_in_jsonl_summary_and_compare_are_unchanged() -> None:
    """The files a replay writes carry the status vocabulary as plain strings, byte for byte."""
    import json

    from client.compare import diff_frame
    from client.summary import ReplayStats

    line = json.dumps(_answer(4, pb.FRAME_STATUS_DROPPED_STALE).to_json_dict(), separators=(",", ":"))
    assert line == (
        '{"camera_id":"c","sequence":4,"capture_timestamp_ns":0,"status":"DROPPED_STALE","message":"",'
        '"image_width":0,"image_height":0,"detections":[],"timings":{"queue_us":0,"preprocess_us":0,'
        '"inference_us":0,"postprocess_us":0,"total_us":0,"batch_size":0},"latency_ms":2.0}'
    )
    wire = [pb.FRAME_STATUS_OK, pb.FRAME_STATUS_DROPPED_STALE, pb.FRAME_STATUS_EXPIRED, pb.FRAME_STATUS_INVALID,
            pb.FRAME_STATUS_OVERLOADED, pb.FRAME_STATUS_DROPPED_STALE,
            cast(pb.FrameStatus, 99)]  # a status this client does not know (a newer server's)
    results = [_answer(i, s) for i, s in enumerate(wire)]
    assert [r.to_json_dict()["status"] for r in results] == [
        "OK", "DROPPED_STALE", "EXPIRED", "INVALID", "OVERLOADED", "DROPPED_STALE", "INVALID"]
    assert all(FrameResult.from_json_dict(r.to_json_dict()).status is r.status for r in results)
    stats = ReplayStats()
    for r in results:
        stats.add(r)
    stats.lost = 2
    dropped = stats.as_dict()["dropped"]
    assert json.dumps(dropped) == '{"expired": 1, "invalid": 2, "overloaded": 1, "stale": 2, "lost": 2}'
    assert all(type(k) is str for k in dropped), "summary keys are plain strings, not enum members"
    assert [drop_reason(r.status) for r in results[1:5]] == [DropReason.STALE, DropReason.EXPIRED, DropReason.INVALID,
                                                        DropReason.OVERLOADED]
    with pytest.raises(ValueError, match="not dropped"):
        _ = drop_reason(results[0].status)
    diff = diff_frame(results[0], results[1]).as_dict()["status"]
    assert diff == {"a": "OK", "b": "DROPPED_STALE"} and all(type(v) is str for v in diff.values())


def test_a_lookup_left_pending_by_a_closed_loop_does_not_break_the_asyncio_pool() -> None:
    """A loop closed with the pool's lookup still pending (run_until_complete, then close):
    every later anext on another loop awaited that task and failed ("attached to a different
    loop"). The new loop makes its own lookup."""
    import asyncio
    import time as _time
    import warnings

    from client.channels import ChannelPool
    from client.config import ClientConfig

    def slow(host: str, port: int, type: int = 0) -> list:
        _time.sleep(0.2)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.2.0.1", port))]

    pool = ChannelPool(ClientConfig(targets=("svc:50051",)), aio=True, resolver=slow)
    first = asyncio.new_event_loop()
    waiting = first.create_task(pool.anext())
    first.run_until_complete(asyncio.sleep(0.05))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first.close()  # the lookup and its caller left pending
    del waiting

    async def again() -> str:
        try:
            return (await asyncio.wait_for(pool.anext(), 5)).address
        finally:
            await pool.aclose()

    assert asyncio.run(again()) == "svc:50051"
