"""Label QA: geometric defects on injected mistakes, model-assisted rules on given detections,
and the end-to-end measurement with the shipped default model."""

from __future__ import annotations

import json

import numpy as np
import pytest

from build_engine.data.generate import generate_dataset
from build_engine.label_qa.issues import find_geometric_issues
from build_engine.label_qa.measure import GEOMETRIC, inject, measure, score_flags
from build_engine.label_qa.model_assisted import image_issues
from build_engine.label_qa.records import LabelRecord, read_label_set
from perception.coco import read_json


@pytest.fixture(scope="module")
def val_set(tmp_path_factory):
    return generate_dataset(tmp_path_factory.mktemp("qa"), 10, seed=21, width=320, height=192)


def test_clean_generated_labels_have_no_geometric_issues(val_set) -> None:
    assert find_geometric_issues(read_label_set(val_set)) == []


def test_injected_geometric_mistakes_are_all_found(val_set, tmp_path) -> None:
    r = measure(val_set, None, tmp_path / "bad", per_kind=4, seed=3)
    assert r["injected"] == 4 * len(GEOMETRIC)
    assert r["recall"] == 1.0 and r["precision"] == 1.0 and r["flags_on_clean_data"] == 0


def test_yolo_unknown_class_is_flagged_not_fatal(val_set, tmp_path) -> None:
    import shutil

    d = tmp_path / "y"
    shutil.copytree(val_set, d)
    (d / "annotations.json").unlink()
    (d / "labels" / "000001.txt").write_text("12 0.5 0.5 0.1 0.1\n0 0.5 0.5 0.0 0.1\n")
    issues = find_geometric_issues(read_label_set(d))
    kinds = sorted((i.kind, i.ref) for i in issues)
    assert kinds == [("unknown_class", "labels/000001.txt:1"), ("zero_area", "labels/000001.txt:2")]


def test_two_yolo_images_of_one_name_are_flagged(val_set, tmp_path) -> None:
    """a.jpg and a.png read labels/a.txt (training refuses the set): flagged, not fatal here."""
    import shutil

    d = tmp_path / "y"
    shutil.copytree(val_set, d)
    (d / "annotations.json").unlink()
    shutil.copy(d / "images" / "000001.jpg", d / "images" / "000001.png")
    issues = [i for i in find_geometric_issues(read_label_set(d)) if i.kind == "shared_label_file"]
    assert [(i.image, i.ref, i.score) for i in issues] == [("images/000001.png", "labels/000001.txt", 1.0)]
    assert "images/000001.jpg reads the same label file" in issues[0].detail


def test_lint_cli_json_and_table(val_set, tmp_path, capsys) -> None:
    from perception.cli import main

    gt, _ = inject(read_json(val_set / "annotations.json"), 1, 0, ("duplicate", "unknown_class"))
    d = tmp_path / "c"
    d.mkdir()
    (d / "annotations.json").write_text(json.dumps(gt))
    (d / "images").symlink_to(val_set / "images")
    out = tmp_path / "issues.json"
    capsys.readouterr()
    assert main(["lint-labels", "--data", str(d), "--json-out", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert sorted(x["kind"] for x in rows) == ["duplicate", "unknown_class"]
    assert {"image", "box", "kind", "score"} <= set(rows[0])
    assert "issues: duplicate 1, unknown_class 1" in capsys.readouterr().out


def test_model_assisted_checks_read_an_ssd_checkpoint_as_an_ssd(val_set, tmp_path) -> None:
    """lint-labels --checkpoint read every model's outputs as a YOLO head's: an SSD (or
    two-stage) checkpoint failed to decode. It now reads them as the model's family outputs.
    And its images may lie beside annotations.json, as the other readers take them (the model
    could not open them there)."""
    import shutil

    from build_engine.checkpoint import meta_for, save_checkpoint
    from perception.cli import main
    from tests.build_engine.test_ssd_family import _tiny_ssd

    flat = tmp_path / "flat"
    flat.mkdir()
    shutil.copy(val_set / "annotations.json", flat)
    for image in (val_set / "images").iterdir():
        shutil.copy(image, flat)
    model = _tiny_ssd()
    ckpt = save_checkpoint(tmp_path / "ssd.pt", model, meta_for(model))
    assert main(["lint-labels", "--data", str(flat), "--checkpoint", str(ckpt),
                 "--json-out", str(tmp_path / "issues.json")]) == 0
    assert isinstance(json.loads((tmp_path / "issues.json").read_text()), list)


def test_model_rules_on_given_detections(val_set) -> None:
    ls = read_label_set(val_set)

    def big(r: LabelRecord) -> bool:
        return min(r.box[2] - r.box[0], r.box[3] - r.box[1]) >= 8

    iid = max(ls.images, key=lambda i: sum(1 for r in ls.records if r.image_id == i and big(r)))
    recs = [r for r in ls.records if r.image_id == iid and big(r)]
    assert len(recs) >= 2
    boxes = np.array([r.box for r in recs], np.float32)
    cls = np.array([r.class_id for r in recs], np.int64)
    # A model that agrees with every label: no issue.
    assert image_issues(ls, iid, (boxes, np.full(len(recs), 0.9, np.float32), cls)) == []
    # It calls label 0 another class, sees label 1 shifted by 40% of its width, sees an object
    # in the sky nobody labelled, and sees nothing at all where an isolated label z would be.
    from perception.boxes import box_iou

    db = boxes.copy()
    w1 = db[1, 2] - db[1, 0]
    db[1, [0, 2]] += 0.4 * w1
    dc = cls.copy()
    dc[0] = (cls[0] + 1) % 7
    iso = box_iou(boxes, db)
    np.fill_diagonal(iso, 0)
    z = next(k for k in range(2, len(recs)) if iso[k].max() < 0.1 and iso[:, k].max() < 0.1)
    extra = np.array([[10, 5, 40, 30]], np.float32)
    keep = [k for k in range(len(recs)) if k != z]
    det = (np.concatenate([db[keep], extra]), np.full(len(keep) + 1, 0.9, np.float32), np.concatenate([dc[keep], [0]]))
    got = {(i.kind, i.ref) for i in image_issues(ls, iid, det)}
    assert got == {("wrong_class", recs[0].ref), ("bad_box", recs[1].ref), ("missing_label", ""),
                   ("no_object", recs[z].ref)}
    # Label 1 a third of its width off (IoU 0.5) is flagged; a quarter off (IoU 0.6) is not: the
    # model's own boxes of small objects are that far off (the band is [0.2, 0.5)).
    conf = np.full(len(recs), 0.9, np.float32)
    for shift, flagged in ((1 / 3 + 0.01, True), (0.25, False)):
        near = boxes.copy()
        near[1, [0, 2]] += shift * w1
        issues = image_issues(ls, iid, (near, conf, cls))
        assert [(i.kind, i.ref) for i in issues] == ([("bad_box", recs[1].ref)] if flagged else []), shift
    # ... and not when another confident detection of its class fits it well.
    both = (np.concatenate([near, boxes[1:2]]), np.append(conf, np.float32(0.9)), np.append(cls, cls[1]))
    assert image_issues(ls, iid, both) == []


def test_objects_in_a_crowd_region_are_no_missing_labels(val_set) -> None:
    """Label QA dropped the crowd flag: the cars inside a crowd region (which training and
    evaluation ignore) were flagged as missing labels, and the region itself, no one object,
    could be flagged as a box no detection fits."""
    import dataclasses

    ls = read_label_set(val_set)
    iid = next(iter(ls.images))
    f, w, h = ls.images[iid]
    region = LabelRecord(iid, f, w, h, (100.0, 100.0, 300.0, 200.0), 0, "annotations[crowd]", crowd=True)
    alone = LabelRecord(iid, f, w, h, (400.0, 100.0, 440.0, 140.0), 0, "annotations[alone]")
    ls = dataclasses.replace(ls, records=[region, alone])
    inside = np.array([[110, 110, 150, 150], [200, 120, 260, 170], [400, 100, 440, 140]], np.float32)
    det = (inside, np.full(3, 0.9, np.float32), np.zeros(3, np.int64))
    assert image_issues(ls, iid, det) == []
    outside = np.array([[500, 10, 540, 50]], np.float32)  # in no region, no label: missing
    got = image_issues(ls, iid, (np.concatenate([inside, outside]), np.full(4, 0.9, np.float32), np.zeros(4, np.int64)))
    assert [(i.kind, tuple(round(v) for v in i.box)) for i in got] == [("missing_label", (500, 10, 540, 50))]


def test_model_assisted_finds_injected_mistakes(repo_root, tmp_path) -> None:
    ckpt = repo_root / "models" / "default" / "detector.pt"
    if not ckpt.is_file():
        pytest.skip("models/default/detector.pt is not trained yet")
    data = generate_dataset(tmp_path / "val", 24, seed=77, width=640, height=360)
    r = measure(data, str(ckpt), tmp_path / "bad", per_kind=4, seed=1)
    for kind in ("wrong_class", "missing_label", "no_object", "bad_box"):
        assert r["per_kind"][kind]["recall"] >= 0.5, (kind, r["per_kind"][kind])
    assert r["precision"] >= 0.5, r


def test_score_flags_counts() -> None:
    from build_engine.label_qa.issues import Issue

    inj = [{"kind": "bad_box", "image_id": 1, "box": [0, 0, 10, 10], "ann_id": 5}]
    flags = [Issue("a", 1, (0, 0, 10, 10), "bad_box", 0.9, "car", "annotations[3] (id 5)"),
             Issue("a", 1, (50, 50, 60, 60), "missing_label", 0.8)]
    r = score_flags(flags, inj)
    assert r["recall"] == 1.0 and r["precision"] == 0.5 and r["precision_at_n_injected"] == 1.0


def test_non_finite_boxes_are_flagged_in_coco_and_yolo(val_set, tmp_path) -> None:
    """JSON and float() parse NaN / Infinity; every comparison with NaN is false, so no check
    fired and the model-assisted pass silently dropped the record, while `perception train`
    refuses the file. They are now flagged (and kept out of the model-assisted pass)."""
    import shutil

    from build_engine.label_qa.records import boxes_of

    gt = read_json(val_set / "annotations.json")
    gt["annotations"][0]["bbox"][0] = float("nan")
    gt["annotations"][1]["bbox"][2] = float("inf")
    d = tmp_path / "c"
    d.mkdir()
    (d / "annotations.json").write_text(json.dumps(gt))  # writes NaN / Infinity, as some tools do
    (d / "images").symlink_to(val_set / "images")
    ls = read_label_set(d)
    got = [(i.kind, i.ref) for i in find_geometric_issues(ls)]
    ids = [a["id"] for a in gt["annotations"][:2]]
    assert got == [("non_finite", f"annotations[0] (id {ids[0]})"), ("non_finite", f"annotations[1] (id {ids[1]})")]
    iid = gt["annotations"][0]["image_id"]
    assert all(r.ref != got[0][1] for r in boxes_of(ls, iid)[2])
    rows = [i.to_dict() for i in find_geometric_issues(ls)]
    assert rows[0]["box"][0] is None and "NaN" not in json.dumps(rows)  # strict JSON out
    y = tmp_path / "y"
    shutil.copytree(val_set, y)
    (y / "annotations.json").unlink()
    (y / "labels" / "000001.txt").write_text("0 nan 0.5 0.1 0.1\n1 0.5 0.5 inf 0.1\n")
    got = sorted((i.kind, i.ref) for i in find_geometric_issues(read_label_set(y)))
    assert got == [("non_finite", "labels/000001.txt:1"), ("non_finite", "labels/000001.txt:2")]


def test_one_object_labelled_under_two_classes_is_a_class_conflict(val_set, tmp_path) -> None:
    """The duplicate check required the same class: a car also labelled truck (IoU 0.95) was
    not reported. Such a pair is now a class_conflict; a same-class pair is still a duplicate."""
    import copy

    gt = read_json(val_set / "annotations.json")
    a = next(x for x in gt["annotations"] if min(x["bbox"][2:]) >= 20)
    other = copy.deepcopy(a)
    other["id"] = max(x["id"] for x in gt["annotations"]) + 1
    other["category_id"] = a["category_id"] % len(gt["categories"]) + 1
    x, y, w, h = a["bbox"]
    other["bbox"] = [x + 0.025 * w, y, w, h]  # IoU 0.95
    gt["annotations"].append(other)
    d = tmp_path / "c"
    d.mkdir()
    (d / "annotations.json").write_text(json.dumps(gt))
    (d / "images").symlink_to(val_set / "images")
    issues = find_geometric_issues(read_label_set(d))
    assert [(i.kind, i.ref) for i in issues] == [("class_conflict", f"annotations[{len(gt['annotations']) - 1}] "
                                                                    f"(id {other['id']})")]
    assert issues[0].score == pytest.approx(0.95, abs=0.01) and f"(id {a['id']})" in issues[0].detail


def _coco_set(d, images, annotations, write_images=True):
    """A tiny COCO set in ``d``: ``images`` as (id, file, width, height), grey images written."""
    import cv2

    (d / "images").mkdir(parents=True)
    for _, f, w, h in images:
        if write_images and w > 0 and h > 0:
            cv2.imwrite(str(d / "images" / f), np.full((h, w, 3), 128, np.uint8))
    gt = {"images": [{"id": i, "file_name": f, "width": w, "height": h} for i, f, w, h in images],
          "categories": [{"id": 1, "name": "car"}, {"id": 2, "name": "pedestrian"}], "annotations": annotations}
    (d / "annotations.json").write_text(json.dumps(gt))
    return d


def _yolo_set(d, labels):
    """A tiny YOLO set in ``d``: one 100x80 image a.jpg, classes car / pedestrian, ``labels``
    {file name: bytes} under labels/."""
    import cv2

    (d / "images").mkdir(parents=True)
    (d / "labels").mkdir()
    cv2.imwrite(str(d / "images" / "a.jpg"), np.full((80, 100, 3), 128, np.uint8))
    (d / "classes.txt").write_text("car\npedestrian\n")
    for name, data in labels.items():
        (d / "labels" / name).write_bytes(data)
    return d


def test_unreadable_label_files_are_one_line_errors_naming_the_file_and_record(tmp_path) -> None:
    """An image of width 0 gave "float division by zero", annotations null "'NoneType' object is
    not iterable", a label file that is not text a codec error naming no file."""
    from perception.errors import DataError

    box = {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20]}
    zero = _coco_set(tmp_path / "zero", [(1, "a.jpg", 0, 80)], [box])
    with pytest.raises(DataError, match=r"zero/annotations.json: images\[0\] \(id 1, a.jpg\) needs a positive"):
        find_geometric_issues(read_label_set(zero))
    null = _coco_set(tmp_path / "null", [(1, "a.jpg", 100, 80)], None)
    with pytest.raises(DataError, match="null/annotations.json: 'annotations' must be a list"):
        read_label_set(null)
    binary = _yolo_set(tmp_path / "bin", {"a.txt": b"\xff\xfe\x00garbage\x80\x81"})
    with pytest.raises(DataError, match=r"bin/labels/a.txt: the label file is not UTF-8 text") as ei:
        read_label_set(binary)
    assert len(str(ei.value).splitlines()) == 1


def test_what_training_refuses_is_flagged_not_merged_or_missed(tmp_path) -> None:
    """A label file without an image was "issues: none" while training refused the set; a
    repeated image id was merged silently (the second image's size judged the first image's
    box: a bogus outside_image) while training refused it too. Both are flagged now, as
    training's refusals are (score 1)."""
    from build_engine.data.formats import read_labelled_set
    from build_engine.label_qa.issues import KINDS
    from perception.errors import DataError

    orphan = _yolo_set(tmp_path / "orphan", {"a.txt": b"0 0.5 0.5 0.2 0.2\n", "b.txt": b"0 0.5 0.5 0.2 0.2\n"})
    issues = find_geometric_issues(read_label_set(orphan))
    assert [(i.kind, i.ref, i.score) for i in issues] == [("orphan_label_file", "labels/b.txt", 1.0)]
    with pytest.raises(DataError, match="b.txt: label file has no image"):
        read_labelled_set(orphan)
    box = {"id": 1, "image_id": 1, "category_id": 1, "bbox": [50, 40, 20, 20]}  # inside a.jpg, not b.jpg
    twice = _coco_set(tmp_path / "twice", [(1, "a.jpg", 100, 80), (1, "b.jpg", 40, 30)], [box])
    issues = find_geometric_issues(read_label_set(twice))
    got = [(i.kind, i.image, i.ref, i.score) for i in issues]
    assert got == [("repeated_image_id", "images/b.jpg", "images[1]", 1.0)]
    assert "images[0]" in issues[0].detail
    with pytest.raises(DataError, match="repeats image id 1"):
        read_labelled_set(twice)
    assert {"orphan_label_file", "repeated_image_id"} <= set(KINDS)


def test_crowd_regions_are_sized_by_no_one_object_and_copies_are_reported_once(tmp_path) -> None:
    """A crowd region (iscrowd 1, an ignore region in training) around most of the image was
    flagged huge_box. Three copies of a box gave three duplicates (every pair), the third copy
    flagged twice."""
    anns = [{"id": 1, "image_id": 1, "category_id": 2, "bbox": [0, 0, 100, 78], "iscrowd": 1},
            {"id": 2, "image_id": 1, "category_id": 2, "bbox": [60, 5, 1, 1], "iscrowd": 1},
            {"id": 3, "image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20]},
            {"id": 4, "image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20]},
            {"id": 5, "image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20]},
            {"id": 6, "image_id": 1, "category_id": 2, "bbox": [10, 10, 20, 20]}]
    d = _coco_set(tmp_path / "c", [(1, "a.jpg", 100, 80)], anns)
    got = sorted((i.kind, i.ref, i.detail) for i in find_geometric_issues(read_label_set(d)))
    assert got == [("class_conflict", "annotations[5] (id 6)", "IoU 1.00 with annotations[2] (id 3) labelled car"),
                   ("duplicate", "annotations[3] (id 4)", "IoU 1.00 with annotations[2] (id 3)"),
                   ("duplicate", "annotations[4] (id 5)", "IoU 1.00 with annotations[2] (id 3)")]
    anns[0]["iscrowd"] = 0  # an object that size is still worth a look
    d = _coco_set(tmp_path / "o", [(1, "a.jpg", 100, 80)], anns)
    huge = [i.ref for i in find_geometric_issues(read_label_set(d)) if i.kind == "huge_box"]
    assert huge == ["annotations[0] (id 1)"]
