"""Run a detector (a PyTorch checkpoint or an ONNX file) over a labelled dataset and score it.

Inference goes through the serving code: ``perception.preprocess`` (letterbox) ->
model -> ``perception.postprocess`` (decode, NMS, map back to source pixels), and ONNX files
run in ``server.runtime.onnxruntime_backend.OnnxRuntimeBackend``, so the numbers are what the
server would produce.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Callable

import cv2
import numpy as np
from numpy.typing import NDArray

from build_engine.data.formats import LabelledSet, read_labelled_set, samples_to_coco
from perception.boxes import xyxy_to_xywh
from perception.errors import DataError, ModelError
from perception.kpi import KpiReport, evaluate_coco
from perception.manifest import PostprocessSpec, PreprocessSpec
from perception.postprocess import PostprocessOptions, postprocess
from perception.preprocess import preprocess_batch

log = logging.getLogger(__name__)

# mAP needs the whole PR curve: keep low-scoring detections (COCO practice); P / R / F1 are
# reported at the deployed threshold separately.
EVAL_SCORE_THRESHOLD = 0.001

Runner = Callable[[NDArray[np.float32]], NDArray[np.float32]]


def eval_options(post: PostprocessSpec | None = None) -> PostprocessOptions:
    p = post or PostprocessSpec()
    return PostprocessOptions(
        score_threshold=EVAL_SCORE_THRESHOLD, iou_threshold=p.iou_threshold, max_detections=100,
        pre_nms_topk=p.pre_nms_topk, class_agnostic=p.class_agnostic,
    )


def read_image(path: Path) -> NDArray[np.uint8]:
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise DataError(f"{path}: image does not decode")
    return img


def predict(
    runner: Runner, dataset: LabelledSet, pre: PreprocessSpec, options: PostprocessOptions,
    batch_size: int = 8, progress: bool = False,
) -> list[dict[str, Any]]:
    """COCO results (category ids 1..C, xywh boxes in source pixels) for every sample."""
    results: list[dict[str, Any]] = []
    idx = range(0, len(dataset.samples), batch_size)
    if progress:
        from tqdm import tqdm

        idx = tqdm(idx, desc="eval", unit="batch")
    for start in idx:
        chunk = dataset.samples[start:start + batch_size]
        batch, lbs = preprocess_batch([read_image(s.file) for s in chunk], pre)
        out = runner(batch)
        for s, o, lb in zip(chunk, out, lbs):
            det = postprocess(o, lb, options)
            for b, sc, c in zip(xyxy_to_xywh(det.boxes).tolist(), det.scores.tolist(), det.class_ids.tolist()):
                results.append({"image_id": s.image_id, "category_id": int(c) + 1, "bbox": [round(v, 2) for v in b], "score": round(float(sc), 5)})
    return results


def torch_runner(model: Any) -> Runner:
    import torch

    model.eval()

    def run(batch: NDArray[np.float32]) -> NDArray[np.float32]:
        with torch.no_grad():
            return model(torch.from_numpy(batch)).numpy()

    return run


def onnx_runner(path: Path, threads: int = 2) -> tuple[Runner, Callable[[], None]]:
    from server.runtime.onnxruntime_backend import OnnxRuntimeBackend

    backend = OnnxRuntimeBackend(path, intra_op_threads=threads, max_batch=64)
    backend.activate()
    return backend.infer, backend.deactivate


def onnx_input_size(path: Path) -> tuple[int, int]:
    """(width, height) of an ONNX model's static input (a manifest beside it wins, if present)."""
    manifest = path.parent / "manifest.json"
    if manifest.is_file():
        from perception.manifest import load_manifest

        m = load_manifest(manifest, verify_checksums=False)
        return m.preprocess.input_width, m.preprocess.input_height
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise ModelError(f"{path}: not a readable ONNX file: {exc}") from exc
    dims = model.graph.input[0].type.tensor_type.shape.dim
    h, w = dims[2].dim_value, dims[3].dim_value
    if not h or not w:
        raise ModelError(f"{path}: input height/width are not static; pass a manifest.json beside it")
    return int(w), int(h)


def evaluate_runner(
    runner: Runner, dataset: LabelledSet, input_size: tuple[int, int], score_threshold: float = 0.25,
    batch_size: int = 8, progress: bool = False,
) -> tuple[KpiReport, list[dict[str, Any]], dict[str, Any]]:
    """(KPI report, COCO results, COCO ground truth) of a runner on a dataset."""
    pre = PreprocessSpec(input_width=input_size[0], input_height=input_size[1])
    preds = predict(runner, dataset, pre, eval_options(), batch_size, progress)
    gt = samples_to_coco(dataset.samples, dataset.classes, dataset.root)
    return evaluate_coco(gt, preds, score_threshold), preds, gt


def evaluate_checkpoint(
    checkpoint: str | os.PathLike[str], data_dir: str | os.PathLike[str], score_threshold: float = 0.25,
    progress: bool = False,
) -> tuple[KpiReport, list[dict[str, Any]], dict[str, Any]]:
    from build_engine.prune import load_any_checkpoint

    model, meta = load_any_checkpoint(checkpoint)  # plain or pruned
    ds = read_labelled_set(data_dir)
    return evaluate_runner(torch_runner(model), ds, tuple(meta.input_size), score_threshold, progress=progress)  # type: ignore[arg-type]


def evaluate_onnx(
    onnx_path: str | os.PathLike[str], data_dir: str | os.PathLike[str], score_threshold: float = 0.25,
    progress: bool = False,
) -> tuple[KpiReport, list[dict[str, Any]], dict[str, Any]]:
    p = Path(onnx_path)
    if not p.is_file():
        raise ModelError(f"{p}: no such ONNX file")
    size = onnx_input_size(p)
    ds = read_labelled_set(data_dir)
    run, close = onnx_runner(p)
    try:
        return evaluate_runner(run, ds, size, score_threshold, progress=progress)
    finally:
        close()


def write_report(out_dir: str | os.PathLike[str], report: KpiReport, predictions: list[dict[str, Any]] | None = None) -> Path:
    """``out_dir/kpi.json`` (+ results.json) and the PNG plots."""
    from build_engine.plots import write_plots

    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    (d / "kpi.json").write_text(json.dumps(report.to_dict(), indent=1))
    if predictions is not None:
        (d / "results.json").write_text(json.dumps(predictions))
    write_plots(report, d)
    return d
