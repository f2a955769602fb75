"""No frame lost in a replay: every frame read from the source gets exactly one JSONL line (the
server's answer, or a client status with a reason) when the server restarts, drains, or goes
away for good, and a crash leaves only whole lines. Real servers on loopback."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from client.client_status import ClientStatus
from client.config import ClientConfig
from client.detector_client import DetectorClient
from client.frames import SourceFrame
from client.pacing import Pacing
from client.replay import Replay, ReplayConfig, ReplayOutcome
from client.sinks.jsonl import JsonlSink
from perception.cli import main
from perception.types import FrameStatus
from tests.client import recordings as R
from tests.client.conftest import start_server
from tests.conftest import REPO_ROOT

SERVER_STATUSES = {s.value for s in FrameStatus}
CLIENT_STATUSES = {s.value for s in ClientStatus}


def _lines(path: Path) -> list[dict[str, Any]]:
    """Every line of a JSONL, each of which must be a whole JSON object."""
    text = path.read_text()
    assert not text or text.endswith("\n"), "the file ends in a partial line"
    return [json.loads(line) for line in text.splitlines()]


def _one_line_per_frame(recs: list[dict[str, Any]], camera: str, n: int) -> None:
    keys = [(r["camera_id"], r["sequence"]) for r in recs]
    assert sorted(keys) == [(camera, i) for i in range(n)], "each source frame has exactly one line"


def _wait_for_lines(path: Path, n: int, timeout_s: float = 15.0) -> None:
    """Wait until the JSONL at ``path`` has ``n`` lines: the replay is under way."""
    end = time.monotonic() + timeout_s
    while not (path.exists() and path.read_bytes().count(b"\n") >= n):
        if time.monotonic() > end:
            raise AssertionError(f"{path.name}: fewer than {n} lines after {timeout_s} s")
        time.sleep(0.01)


class _Outage:
    """Takes the server on ``port`` down once the replay has written ``after_lines`` lines to
    ``out`` (``grace_s`` 0: at once; > 0: it drains first) and, with ``back_after_s``, starts a
    new one on the same port that much later. Triggered by progress, not by the clock, so a
    slow start of the replay cannot make the outage happen before it."""

    def __init__(self, manifest: Path, out: Path, after_lines: int = 10, back_after_s: float | None = None,
                 grace_s: float = 0.0) -> None:
        first, self.port = start_server(manifest)
        self.servers: list[Any] = [first]
        self.down_at: float | None = None  # time.monotonic() when the server went down
        self._manifest, self._out, self._after_lines = manifest, out, after_lines
        self._back_after_s, self._grace_s = back_after_s, grace_s
        self._thread = threading.Thread(target=self._run, name="outage", daemon=True)
        self.error: BaseException | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _run(self) -> None:
        try:
            _wait_for_lines(self._out, self._after_lines)
            self.down_at = time.monotonic()
            self.servers[0].shutdown(self._grace_s)
            if self._back_after_s is not None:
                time.sleep(self._back_after_s)
                self.servers.append(start_server(self._manifest, port=self.port)[0])
        except BaseException as exc:  # re-raised on exit: a failed outage must fail the test
            self.error = exc

    def __enter__(self) -> _Outage:
        self._thread.start()
        return self

    def __exit__(self, *_: Any) -> None:
        self._thread.join(30)
        for srv in self.servers:
            srv.shutdown(0.0)
        if self.error is not None:
            raise self.error


def _replay(*args: str) -> int:
    return main(["replay", *args, "--no-progress"])


def test_a_server_restarted_mid_replay_loses_no_frame(tmp_path: Path, tiny_manifest: Path) -> None:
    src = R.write_mp4(tmp_path / "front.mp4", n=60, fps=20.0)  # 3 s in real time
    out, summ = tmp_path / "o.jsonl", tmp_path / "s.json"
    with _Outage(tiny_manifest, out, after_lines=10, back_after_s=2.5) as outage:
        rc = _replay(str(src), "--server", outage.address, "--out", str(out), "--json-out", str(summ))
    assert rc == 0
    recs = _lines(out)
    _one_line_per_frame(recs, "front", 60)
    assert {x["status"] for x in recs} <= SERVER_STATUSES, "every frame answered by a server, none given up"
    assert [x["sequence"] for x in recs] == list(range(60)), "answers stay in order across the restart"
    s = json.loads(summ.read_text())
    assert s["reconnects"] >= 1, "the restart must actually have been crossed"
    assert s["frames_source"] == s["frames_sent"] == s["frames_answered"] == 60
    assert s["frames_not_sent"] == 0 and set(s["client_status"].values()) == {0} and "lost" not in s["dropped"]


def test_frames_refused_by_a_draining_server_are_resent(tmp_path: Path, tiny_manifest: Path) -> None:
    src = R.write_mp4(tmp_path / "front.mp4", n=60, fps=20.0)
    out, summ = tmp_path / "o.jsonl", tmp_path / "s.json"
    # grace 1 s: the server refuses new frames ("shutting down"), answers those in flight,
    # ends the stream UNAVAILABLE and stops; a new one starts on the same port.
    with _Outage(tiny_manifest, out, after_lines=10, back_after_s=0.5, grace_s=1.0) as outage:
        rc = _replay(str(src), "--server", outage.address, "--out", str(out), "--json-out", str(summ))
    assert rc == 0
    recs = _lines(out)
    _one_line_per_frame(recs, "front", 60)
    assert not [x for x in recs if "shutting down" in x.get("message", "")], "a refusal is not an answer"
    assert {x["status"] for x in recs} <= SERVER_STATUSES
    s = json.loads(summ.read_text())
    assert s["drain_refusals"] >= 1, "the drain must actually have refused a frame"
    assert s["frames_source"] == s["frames_sent"] == s["frames_answered"] == 60 and s["frames_not_sent"] == 0


def test_a_server_that_never_comes_back_accounts_for_every_frame(
    tmp_path: Path, tiny_manifest: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = R.write_mp4(tmp_path / "front.mp4", n=40, fps=20.0)  # 2 s in real time
    out, summ = tmp_path / "o.jsonl", tmp_path / "s.json"
    with _Outage(tiny_manifest, out, after_lines=10) as outage:
        # No --reconnect-attempts: the time bound alone ends the reconnecting.
        rc = _replay(str(src), "--server", outage.address, "--out", str(out), "--json-out", str(summ),
                     "--reconnect-timeout", "1.5")
        ended = time.monotonic()
    assert outage.down_at is not None and ended - outage.down_at >= 1.5, "gave up only after the timeout"
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and err[-1].startswith("perception replay: error: server 127.0.0.1:")
    gave_up = re.search(r"\(camera front gave up after \d+ reconnect attempts in (\d+\.\d) s\)$", err[-1])
    assert gave_up is not None and 1.5 <= float(gave_up.group(1)) < 10, err[-1]
    assert "Traceback" not in "\n".join(err)
    recs = _lines(out)
    _one_line_per_frame(recs, "front", 40)
    answered = [x for x in recs if x["status"] in SERVER_STATUSES]
    unanswered = [x for x in recs if x["status"] in CLIENT_STATUSES]
    assert len(answered) + len(unanswered) == 40
    assert answered and unanswered and all(x["reason"] for x in unanswered)
    by_status = {st: [x for x in unanswered if x["status"] == st] for st in CLIENT_STATUSES}
    assert by_status["GIVEN_UP"], "the frames in flight when the server went away"
    assert all("gave up after" in x["reason"] for x in by_status["GIVEN_UP"])
    assert by_status["NOT_SENT"], "the rest of the recording"
    assert all(x["reason"].startswith("the replay stopped: server 127.0.0.1:") for x in by_status["NOT_SENT"])
    assert max(x["sequence"] for x in answered) < min(x["sequence"] for x in by_status["NOT_SENT"])
    s = json.loads(summ.read_text())
    assert s["frames_source"] == s["frames_sent"] + s["frames_not_sent"] == 40
    assert s["frames_answered"] == len(answered) and s["frames_not_sent"] == len(by_status["NOT_SENT"])
    assert s["frames_sent"] == s["frames_answered"] + s["client_status"]["GIVEN_UP"] + s["client_status"][
        "REFUSED_DRAINING"]
    assert {k: v for k, v in s["client_status"].items() if v} == {
        k: len(v) for k, v in by_status.items() if v}
    assert s["dropped"]["lost"] == s["frames_sent"] - s["frames_answered"]


def _run_until(proc: subprocess.Popen[bytes], out: Path, lines: int) -> None:
    """Wait until the replay in ``proc`` has written ``lines`` lines to ``out``."""
    end = time.monotonic() + 15
    while time.monotonic() < end and proc.poll() is None:
        if out.exists() and out.read_bytes().count(b"\n") >= lines:
            return
        time.sleep(0.02)
    raise AssertionError(f"the replay wrote fewer than {lines} lines (exit code {proc.poll()})")


def test_a_replay_killed_mid_run_leaves_only_whole_lines(tmp_path: Path, server: str) -> None:
    src = R.write_mp4(tmp_path / "front.mp4", n=200, fps=20.0)  # 10 s: killed long before the end
    out = tmp_path / "o.jsonl"
    cmd = [sys.executable, "-m", "perception.cli", "replay", str(src), "--server", server, "--out", str(out),
           "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _run_until(proc, out, 10)
        proc.send_signal(signal.SIGKILL)  # no handler, no flush, no close: a crash
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    recs = _lines(out)
    assert 10 <= len(recs) < 200
    assert [x["sequence"] for x in recs] == list(range(len(recs)))


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_or_sigterm_mid_replay_accounts_for_every_frame(
    tmp_path: Path, server: str, sig: signal.Signals, code: int
) -> None:
    """Ctrl-C, and SIGTERM (docker stop, systemd) alike: every frame has its line (SIGTERM used
    to kill the replay at once, with no record of the frames in flight or not sent)."""
    src = R.write_mp4(tmp_path / "front.mp4", n=200, fps=20.0)
    out, summ = tmp_path / "o.jsonl", tmp_path / "s.json"
    cmd = [sys.executable, "-m", "perception.cli", "replay", str(src), "--server", server, "--out", str(out),
           "--json-out", str(summ), "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _run_until(proc, out, 10)
        proc.send_signal(sig)
        assert proc.wait(20) == code
    finally:
        if proc.poll() is None:
            proc.kill()
    recs = _lines(out)
    _one_line_per_frame(recs, "front", 200)
    not_sent = [x for x in recs if x["status"] == "NOT_SENT"]
    assert not_sent and all(x["reason"] == "the replay was interrupted" for x in not_sent)
    s = json.loads(summ.read_text())
    assert s["frames_source"] == s["frames_sent"] + s["frames_not_sent"] == 200


def test_sigterm_while_the_sinks_close_is_only_noted() -> None:
    """The replay's SIGTERM handler: the first SIGTERM stops the replay (KeyboardInterrupt);
    once the replay has returned, one while the sinks finish (an MCAP file's summary and
    rename) is noted and does not kill the process, until the handler before is restored."""
    import os

    from client.replay_cli import _SigtermAsInterrupt

    before = signal.getsignal(signal.SIGTERM)
    term = _SigtermAsInterrupt()
    term.install()
    try:
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)  # the handler runs between bytecodes of the main thread
        os.kill(os.getpid(), signal.SIGTERM)  # a second one while the replay drains: noted
        term.raising = False
        os.kill(os.getpid(), signal.SIGTERM)  # while the sinks close: noted
        time.sleep(0.05)
        assert term.came
    finally:
        term.restore()
    assert signal.getsignal(signal.SIGTERM) is before


class _InterruptedWhileReading:
    """A recording whose first pass is broken off by Ctrl-C while frame ``at`` is being read."""

    def __init__(self, frames: list[SourceFrame], at: int) -> None:
        self.frames = frames
        self.at: int | None = at

    def __iter__(self) -> Iterator[SourceFrame]:
        for f in self.frames:
            if f.sequence == self.at:
                self.at = None
                raise KeyboardInterrupt
            yield f


def _replay_interrupted_at(tmp_path: Path, server: str, frames: list[SourceFrame], at: int) -> ReplayOutcome:
    """Replay ``frames`` into tmp_path/o.jsonl as fast as answered, Ctrl-C striking while frame
    sequence ``at`` is read; the outcome, which must say it was interrupted."""
    sink = JsonlSink(tmp_path / "o.jsonl")
    with DetectorClient(ClientConfig(targets=(server,), window=2)) as client:
        outcome = Replay(client, _InterruptedWhileReading(frames, at), ReplayConfig(pacing=Pacing(speed=None)),
                         [sink]).run()
    sink.close()
    assert outcome.interrupted
    return outcome


def test_ctrl_c_inside_the_source_still_accounts_for_the_rest(tmp_path: Path, server: str) -> None:
    jpeg = R.jpeg(R.scene(0))
    frames = [SourceFrame(cam, i, R.T0_NS + i * 1_000_000 + k, encoded=jpeg)
              for i in range(12) for k, cam in enumerate(("front", "rear"))]
    outcome = _replay_interrupted_at(tmp_path, server, frames, 7)
    keys = sorted([(r.camera_id, r.sequence) for r in outcome.results]
                  + [(u.camera_id, u.sequence) for u in outcome.unanswered])
    assert keys == sorted((f.camera_id, f.sequence) for f in frames), "every frame once, the re-read ones too"
    assert {u.status for u in outcome.unanswered} <= {ClientStatus.NOT_SENT, ClientStatus.GIVEN_UP}
    assert sorted((x["camera_id"], x["sequence"]) for x in _lines(tmp_path / "o.jsonl")) == keys


_DISK_FULL_WRITER = """
import resource, signal, sys
from client.client_status import ClientStatus, Unanswered
from client.sinks.jsonl import JsonlSink
from perception.errors import DataError

path, limit = sys.argv[1], int(sys.argv[2])
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # past the limit write() fails with EFBIG instead
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
sink = JsonlSink(path)
for i in range(10_000):
    try:
        sink.write_unanswered(Unanswered("front", i, i, ClientStatus.NOT_SENT, "x" * 150))
    except DataError as exc:
        print(i, exc)
        break
sink.close()
"""


def test_a_write_cut_short_by_a_full_disk_leaves_only_whole_lines(tmp_path: Path) -> None:
    # A file size limit makes the kernel take only part of the line that crosses it (a short
    # write), as a full disk does; that partial line must not stay in the file.
    out = tmp_path / "o.jsonl"
    line_len = len(json.dumps({"camera_id": "front", "sequence": 0, "capture_timestamp_ns": 0, "status": "NOT_SENT",
                               "reason": "x" * 150, "detections": []}, separators=(",", ":"))) + 1
    limit = 20 * line_len + line_len // 2
    done = subprocess.run([sys.executable, "-c", _DISK_FULL_WRITER, str(out), str(limit)], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    failed_at, message = done.stdout.split(" ", 1)
    assert int(failed_at) >= 20 and "cannot write" in message
    recs = _lines(out)
    assert len(recs) == int(failed_at) and [x["sequence"] for x in recs] == list(range(len(recs)))
    assert out.stat().st_size <= limit


def test_frames_over_the_limit_keep_one_line_when_ctrl_c_breaks_the_source(tmp_path: Path, server: str) -> None:
    """A camera whose frames are all over the server's message limit gets NOT_SENT lines as it
    goes; Ctrl-C inside the source then re-reads it for the rest. Those frames are not written a
    second time (they used to be: only answers and lost frames counted as having a line)."""
    jpeg, huge = R.jpeg(R.scene(0)), b"\xff\xd8" + bytes(9 << 20)  # over the 8 MiB default limit
    frames = [SourceFrame(cam, i, R.T0_NS + i * 1_000_000 + k, encoded=data)
              for i in range(8) for k, (cam, data) in enumerate((("front", jpeg), ("wide", huge)))]
    _replay_interrupted_at(tmp_path, server, frames, 5)
    lines = [(x["camera_id"], x["sequence"]) for x in _lines(tmp_path / "o.jsonl")]
    assert sorted(lines) == sorted((f.camera_id, f.sequence) for f in frames), "every frame exactly once"
    wide = [x for x in _lines(tmp_path / "o.jsonl") if x["camera_id"] == "wide"]
    assert all(x["status"] == "NOT_SENT" for x in wide)
    assert any("message limit" in x["reason"] or "too large" in x["reason"] for x in wide), wide[0]["reason"]
