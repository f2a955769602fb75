"""`perception replay` when something is wrong: a damaged MCAP, an output that cannot be
opened, a --video-camera the replay does not have. Real recordings, a real server on loopback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mcap.records import ChunkIndex

from client.frames import SourceFrame
from client.sources import open_source
from perception.cli import main
from perception.errors import DataError
from tests.client import recordings as R

FRAMES = 30  # one camera, 4 KiB chunks: 15 zstd chunks of two frames each


def _replay(*args: str) -> int:
    return main(["replay", *args, "--no-progress"])


def _recording(tmp_path: Path) -> tuple[bytes, list[ChunkIndex]]:
    """The bytes of a one-camera MCAP and its chunk indexes, in file order."""
    from mcap.reader import make_reader

    path = R.write_mcap_ros2(tmp_path / "full.mcap", cameras=("front",), n=FRAMES, chunk_size=4096)
    with open(path, "rb") as f:
        summary = make_reader(f).get_summary()
    assert summary is not None and summary.chunk_indexes[0].compression == "zstd"
    return path.read_bytes(), sorted(summary.chunk_indexes, key=lambda c: c.chunk_start_offset)


def _flipped(tmp_path: Path) -> Path:
    """The recording with one bit flipped near the start of its middle chunk's zstd data: the
    library fails there with a ZstdError ("Data corruption detected") after 14 frames."""
    data, chunks = _recording(tmp_path)
    chunk = chunks[len(chunks) // 2]
    compressed_from = chunk.chunk_start_offset + chunk.chunk_length - chunk.compressed_size
    damaged = bytearray(data)
    damaged[compressed_from + 10] ^= 0x01
    path = tmp_path / "flipped.mcap"
    path.write_bytes(bytes(damaged))
    return path


def _read_all(path: Path) -> tuple[list[SourceFrame], DataError]:
    """The frames read before the DataError that ends the reading, and that error."""
    got: list[SourceFrame] = []
    with pytest.raises(DataError) as info:
        for f in open_source(path):
            got.append(f)
    return got, info.value


@pytest.mark.parametrize("into", ["header", "records"])
def test_mcap_cut_inside_a_chunk_replays_up_to_the_cut_then_is_a_data_error(tmp_path: Path, into: str) -> None:
    """A recording cut while writing a chunk: cut inside the chunk's header, the library raised
    struct.error ("unpack requires a buffer of 4 bytes") at open, naming no file; cut inside its
    records, the error said neither how far the reading got nor where."""
    data, chunks = _recording(tmp_path)
    chunk = chunks[2]
    cut_at = chunk.chunk_start_offset + (39 if into == "header" else chunk.chunk_length // 2)
    cut = tmp_path / "cut.mcap"
    cut.write_bytes(data[:cut_at])
    got, error = _read_all(cut)
    assert [f.sequence for f in got] == list(range(4)), "the two whole chunks before the cut"
    assert str(error).startswith(f"{cut}: truncated or corrupt MCAP: unreadable after 4 image messages")


def test_mcap_cut_inside_its_first_chunk_is_a_data_error_at_open(tmp_path: Path) -> None:
    data, chunks = _recording(tmp_path)
    cut = tmp_path / "cut.mcap"
    cut.write_bytes(data[: chunks[0].chunk_start_offset + 39])
    with pytest.raises(DataError, match=f"^{cut}: not a readable MCAP file"):
        open_source(cut)


def test_mcap_with_a_flipped_byte_in_a_compressed_chunk_is_a_data_error(tmp_path: Path) -> None:
    path = _flipped(tmp_path)
    got, error = _read_all(path)
    assert [f.sequence for f in got] == list(range(14))
    message = str(error)
    assert message.startswith(f"{path}: truncated or corrupt MCAP: unreadable after 14 image messages, at byte ")
    assert "ZstdError" in message and "Data corruption detected" in message


def test_mcap_with_a_damaged_schema_is_a_data_error(tmp_path: Path) -> None:
    """A damaged ros2msg schema failed in mcap_ros2's schema parser (InvalidFieldDefinition)
    when the replay made the channel's decoder."""
    from mcap_ros2.writer import Writer

    path = tmp_path / "schema.mcap"
    with open(path, "wb") as f:
        writer = Writer(f)
        schema = writer.register_msgdef("sensor_msgs/msg/CompressedImage", R.COMPRESSED_DEF)
        writer.write_message("/cameras/front/image/compressed", schema, {
            "header": {"stamp": {"sec": 1, "nanosec": 0}, "frame_id": "front"}, "format": "jpeg",
            "data": R.jpeg(R.scene(0)),
        }, log_time=R.T0_NS)
        writer.finish()
    data = path.read_bytes()
    definition = R.COMPRESSED_DEF.encode()
    assert data.count(definition) == 1, "the summary's copy of the schema, the one read (the chunk's is compressed)"
    separator = b"=" * 80  # between the message definitions: one byte of it flipped
    path.write_bytes(data.replace(definition, definition.replace(separator, b"=" * 40 + b"?" + b"=" * 39, 1)))
    _, error = _read_all(path)
    assert str(error).startswith(
        f"{path}: /cameras/front/image/compressed: cannot read the schema of sensor_msgs/msg/CompressedImage "
        "(InvalidFieldDefinition: "
    )


def test_replay_of_a_corrupt_mcap_keeps_every_answer_prints_the_summary_and_fails(
    tmp_path: Path, server: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """The damage mid-replay is reported like any damaged recording: every frame read before it
    answered and written, the summary printed, then one error line naming the file and exit 1
    (the raw ZstdError ended the replay at once: 12 of the 14 frames written, no summary)."""
    path = _flipped(tmp_path)
    out, summary = tmp_path / "out.jsonl", tmp_path / "summary.json"
    rc = _replay(str(path), "--server", server, "--out", str(out), "--json-out", str(summary), "--max-rate")
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert rc == 1 and "Traceback" not in captured.err
    assert err[-1].startswith(f"perception replay: error: {path}: truncated or corrupt MCAP: unreadable after 14")
    assert "frames sent 14  answered 14" in captured.out
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["sequence"], r["status"]) for r in records] == [(i, "OK") for i in range(14)]
    assert json.loads(summary.read_text())["frames_answered"] == 14


@pytest.mark.parametrize("failing", ["--out", "--video-out"])
def test_an_output_that_cannot_be_opened_leaves_the_earlier_outputs_as_they_were(
    tmp_path: Path, server: str, capsys: pytest.CaptureFixture[str], failing: str
) -> None:
    """--out (or --video-out) failing to open after --mcap-out was: the MCAP sink was closed,
    and an empty MCAP renamed over the earlier run's; --video-out failing after --out had
    emptied the earlier run's JSONL."""
    src = R.write_mcap_ros2(tmp_path / "drive.mcap", cameras=("front",), n=4)
    out, mcap = tmp_path / "o.jsonl", tmp_path / "o.mcap"
    assert _replay(str(src), "--server", server, "--out", str(out), "--mcap-out", str(mcap), "--max-rate") == 0
    earlier = {p: p.read_bytes() for p in (out, mcap)}
    assert earlier[out].count(b"\n") == 4
    capsys.readouterr()

    if failing == "--out":
        bad, outputs = "/proc/nope/o.jsonl", ["--mcap-out", str(mcap)]
    else:
        bad, outputs = "/proc/nope/v.mp4", ["--out", str(out), "--mcap-out", str(mcap)]
    assert _replay(str(src), "--server", server, *outputs, failing, bad, "--max-rate") == 1
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(f"perception replay: error: {bad}: cannot write")
    assert {p: p.read_bytes() for p in (out, mcap)} == earlier
    assert sorted(p.name for p in tmp_path.iterdir()) == ["drive.mcap", "o.jsonl", "o.mcap"], "no temporary file"


def test_video_camera_the_replay_does_not_have_is_an_error(
    tmp_path: Path, server: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """It wrote no file, said nothing and exited 0. Now the replay's outputs are written and the
    error names the camera asked for and the ones there are."""
    src = R.write_mcap_ros2(tmp_path / "drive.mcap", cameras=("front", "rear"), n=3)
    out, video = tmp_path / "o.jsonl", tmp_path / "v.mp4"
    rc = _replay(str(src), "--server", server, "--out", str(out), "--video-out", str(video),
                 "--video-camera", "side", "--max-rate")
    captured = capsys.readouterr()
    assert rc == 1 and "frames sent 6  answered 6" in captured.out
    assert captured.err.strip().splitlines()[-1] == (
        f"perception replay: error: {video}: not written: the replay has no camera 'side' (its cameras: front, rear)"
    )
    assert out.read_text().count("\n") == 6 and not video.exists()


def test_video_of_a_replay_without_answers_is_an_error(tmp_path: Path) -> None:
    from client.client_status import ClientStatus, Unanswered
    from client.sinks.annotated_video import AnnotatedVideoSink

    video = tmp_path / "v.mp4"
    sink = AnnotatedVideoSink(video, camera_id="front")
    frame = SourceFrame("front", 0, R.T0_NS, encoded=R.jpeg(R.scene(0)))
    sink.write_unanswered(Unanswered.of(frame, ClientStatus.NOT_SENT, "the replay was interrupted"))
    with pytest.raises(DataError, match="not written: no frame of camera 'front' was answered with an image"):
        sink.close()
    sink.close()  # reported once
    assert not video.exists()
