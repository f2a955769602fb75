"""COCO loading: every defect is a one-line DataError naming the file and the record."""

from __future__ import annotations

import json

import numpy as np
import pytest

from perception.coco import load_coco, load_results, parse_coco
from perception.errors import DataError

GOOD = {
    "images": [{"id": 1, "width": 64, "height": 48, "file_name": "a.jpg", "camera_id": "front"}],
    "annotations": [{"id": 7, "image_id": 1, "category_id": 1, "bbox": [1, 2, 10, 20]}],
    "categories": [{"id": 1, "name": "car"}],
}


def write(tmp_path, data, name="gt.json"):
    p = tmp_path / name
    p.write_text(data if isinstance(data, str) else json.dumps(data))
    return p


def test_good_file_loads(tmp_path) -> None:
    ds = load_coco(write(tmp_path, GOOD))
    assert ds.boxes[1].tolist() == [[1, 2, 11, 22]] and ds.labels[1].tolist() == [1]
    assert ds.xywh[1].tolist() == [[1, 2, 10, 20]]
    assert ds.images[1].extra == {"camera_id": "front"} and ds.class_names() == ["car"]


def test_boxes_for_evaluation_are_the_bbox_as_given() -> None:
    data = json.loads(json.dumps(GOOD))
    data["annotations"][0]["bbox"] = [0.1, 0.1, 10.0, 10.0]
    ds = parse_coco(data)
    assert ds.xywh[1].dtype == np.float64 and ds.xywh[1].tolist() == [[0.1, 0.1, 10.0, 10.0]]
    assert ds.boxes[1].tolist() == np.array([[0.1, 0.1, 10.1, 10.1]], np.float32).tolist()


@pytest.mark.parametrize(
    "mutate, fragment",
    [
        (lambda d: d["annotations"][0].update(bbox=[1, 2, 3]), "annotations[0] (id 7)"),
        (lambda d: d["annotations"][0].update(category_id=9), "unknown category_id 9"),
        (lambda d: d["annotations"][0].update(image_id=5), "unknown image_id 5"),
        (lambda d: d["annotations"][0].update(bbox=[0, 0, -1, 2]), "negative"),
        (lambda d: d["images"][0].pop("width"), "images[0] (id 1)"),
        (lambda d: d.update(images=[]), "no images"),
        (lambda d: d.pop("categories"), "'categories'"),
    ],
)
def test_malformed_records_are_named(tmp_path, mutate, fragment) -> None:
    data = json.loads(json.dumps(GOOD))
    mutate(data)
    p = write(tmp_path, data)
    with pytest.raises(DataError) as ei:
        load_coco(p)
    msg = str(ei.value)
    assert str(p) in msg and fragment in msg and "\n" not in msg


def test_broken_json_and_missing_file(tmp_path) -> None:
    with pytest.raises(DataError, match="line 1"):
        load_coco(write(tmp_path, '{"images": [', "broken.json"))
    with pytest.raises(DataError, match="no such file"):
        load_coco(tmp_path / "missing.json")


def test_results_validation(tmp_path) -> None:
    gt = parse_coco(GOOD)
    ok = write(tmp_path, [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 0.5}], "r.json")
    assert len(load_results(ok, gt)) == 1
    bad = write(tmp_path, [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1], "score": "high"}], "bad.json")
    with pytest.raises(DataError, match=r"bad.json: \[0\]"):
        load_results(bad, gt)
    other = write(tmp_path, [{"image_id": 3, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 0.1}], "o.json")
    with pytest.raises(DataError, match="image_id 3"):
        load_results(other, gt)
