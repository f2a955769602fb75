"""What a model must still detect on its verification frames before it is swapped in."""

from __future__ import annotations

from types import SimpleNamespace

from server.verification import _expected


def test_recorded_boxes_of_no_size_are_no_detection_to_miss() -> None:
    """Builds made before boxes wholly in the letterbox padding were dropped recorded them (zero
    height after clipping). The server answers none now, so each one counted as a detection that
    vanished, against max_changed, and a model could fail the verification it passed at build."""
    rows = [[[10, 0, 50, 0, 0.9, 1], [10, 10, 50, 60, 0.8, 2]], [[0, 5, 0, 9, 0.7, 0]]]
    model = SimpleNamespace(manifest=SimpleNamespace(verification=SimpleNamespace(expected={"fp32": rows})),
                            variant=SimpleNamespace(name="fp32", parent=""))
    got = _expected(model)  # type: ignore[arg-type]  # only the fields it reads
    assert got is not None and [len(d) for d in got] == [1, 0]
    assert got[0].boxes.tolist() == [[10, 10, 50, 60]] and got[0].class_ids.tolist() == [2]
