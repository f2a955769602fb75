"""Run a detector (a PyTorch checkpoint or an ONNX file) over a labelled dataset and score it.

Every image goes through the one frame pipeline (``perception.pipeline.FramePipeline``: the
server's decode, letterbox, output decoding, NMS and mapping back to source pixels), and ONNX
files run on the server's own runtime (``server.runtime``), so the numbers are what the
server would produce.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from build_engine.data.formats import LabelledSet, read_labelled_set
from build_engine.gate import check_classes
from perception.coco import detections_to_results
from perception.errors import ModelError
from perception.kpi import KpiReport, evaluate_coco
from perception.manifest import PostprocessSpec, PreprocessSpec
from perception.pipeline import EVAL_REQUEST, FramePipeline, InferFn, RequestOptions

log = logging.getLogger(__name__)

# The names a PyTorch detector's outputs get, in the order its forward returns them; the
# same names its ONNX export gives them (``build_engine.export``).
TORCH_OUTPUT_NAMES = ("output",)


def predict(
    runner: InferFn, dataset: LabelledSet, pipeline: FramePipeline, request: RequestOptions = EVAL_REQUEST,
    batch_size: int = 8, progress: bool = False,
) -> list[dict[str, Any]]:
    """COCO results (the dataset's category ids, xywh boxes in source pixels) for every sample."""
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(dataset.samples), desc="eval", unit="img")
    paths = [s.file for s in dataset.samples]

    def advance(done: int, _total: int) -> None:
        if bar is not None:
            bar.update(done - bar.n)

    try:
        dets = pipeline.detect_files(paths, runner, request, batch_size, progress=advance if bar else None)
    finally:
        if bar is not None:
            bar.close()
    cats = list(dataset.coco_category_ids())  # the dataset's own ids, not 1..C: results.json must match its GT
    results: list[dict[str, Any]] = []
    for s, d in zip(dataset.samples, dets, strict=True):
        results += detections_to_results(d.boxes, d.scores, d.class_ids, s.image_id, cats)
    return results


def torch_runner(model: Any, names: tuple[str, ...] | None = None) -> InferFn:
    """A PyTorch detector as an ``InferFn``: its outputs (a tensor or a tuple) by name.

    names: default the model's own ``output_names`` (every family declares them), the same
    names its ONNX export gives them.
    """
    import torch

    model.eval()
    names = names or tuple(getattr(model, "output_names", TORCH_OUTPUT_NAMES))

    def run(batch: NDArray[np.float32]) -> dict[str, NDArray[Any]]:
        with torch.no_grad():
            out = model(torch.from_numpy(batch))
        outs = out if isinstance(out, (tuple, list)) else (out,)
        return {n: o.numpy() for n, o in zip(names, outs, strict=True)}

    return run


def onnx_runner(path: Path, threads: int = 2) -> tuple[InferFn, Callable[[], None]]:
    from server.runtime.factory import RuntimeSettings, open_backend

    backend = open_backend(path, RuntimeSettings(threads=threads, max_batch=64))
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
    if len(dims) not in (3, 4):
        raise ModelError(f"{path}: input of rank {len(dims)}; expected (B, 3, H, W) or (3, H, W)")
    # The last two axes: a single-image export's input is (3, H, W), without a batch axis.
    h, w = dims[-2].dim_value, dims[-1].dim_value
    if not h or not w:
        raise ModelError(f"{path}: input height/width are not static; pass a manifest.json beside it")
    return int(w), int(h)


def postprocess_for(model: Any, score_threshold: float = 0.25) -> PostprocessSpec:
    """The post-processing spec of a PyTorch detector: the layout its family outputs."""
    return PostprocessSpec(output_layout=getattr(model, "output_layout", "yolo_obj"), score_threshold=score_threshold)


def evaluate_runner(
    runner: InferFn, dataset: LabelledSet, input_size: tuple[int, int], score_threshold: float = 0.25,
    batch_size: int = 8, progress: bool = False, post: PostprocessSpec | None = None,
    pre: PreprocessSpec | None = None, priors: Any = None,
) -> tuple[KpiReport, list[dict[str, Any]], dict[str, Any]]:
    """(KPI report, COCO results, COCO ground truth) of a runner on a dataset. ``pre`` (default:
    this project's letterboxed RGB at ``input_size``) and ``priors``: an artifact's own."""
    pre = pre or PreprocessSpec(input_width=input_size[0], input_height=input_size[1])
    pipeline = FramePipeline(pre, post or PostprocessSpec(), dataset.classes, priors=priors)
    preds = predict(runner, dataset, pipeline, EVAL_REQUEST, batch_size, progress)
    # Crowd regions and given areas kept: scored as ``perception eval --gt --pred`` scores the file.
    gt = dataset.to_coco()
    return evaluate_coco(gt, preds, score_threshold), preds, gt


def evaluate_checkpoint(
    checkpoint: str | os.PathLike[str], data_dir: str | os.PathLike[str], score_threshold: float = 0.25,
    progress: bool = False,
) -> tuple[KpiReport, list[dict[str, Any]], dict[str, Any]]:
    from build_engine.pruned_checkpoint import load_any_checkpoint

    model, meta = load_any_checkpoint(checkpoint)  # plain or pruned
    ds = read_labelled_set(data_dir)
    check_classes(ds.classes, meta.classes, data_dir)
    width, height = meta.input_size
    return evaluate_runner(torch_runner(model), ds, (width, height), score_threshold, progress=progress,
                           post=postprocess_for(model))


def _layout_of_outputs(path: Path) -> str:
    """The layout this project's exports of each family use, known by their output names: an
    SSD head's decoded ``boxes`` and ``scores``, a two-stage model's post-NMS ``num_dets`` and
    ``det_*``; else the YOLO-style ``yolo_obj``. (Read as ``yolo_obj`` whatever they were, the
    other families' exports failed with a hint to map outputs, an option eval does not have.)"""
    import onnx

    try:
        names = {o.name for o in onnx.load(str(path), load_external_data=False).graph.output}
    except Exception as exc:
        raise ModelError(f"{path}: not a readable ONNX file: {exc}") from exc
    if "num_dets" in names and {"det_boxes", "det_scores", "det_classes"} <= names:
        return "nms_detections"
    if {"boxes", "scores"} <= names:
        return "ssd"
    return "yolo_obj"


def evaluate_onnx(
    onnx_path: str | os.PathLike[str], data_dir: str | os.PathLike[str], score_threshold: float = 0.25,
    progress: bool = False,
) -> tuple[KpiReport, list[dict[str, Any]], dict[str, Any]]:
    p = Path(onnx_path)
    if not p.is_file():
        raise ModelError(f"{p}: no such ONNX file")
    size = onnx_input_size(p)
    ds = read_labelled_set(data_dir)
    post, pre, priors = None, None, None
    if (p.parent / "manifest.json").is_file():  # the artifact's own contract: its input, layout and priors
        import dataclasses

        from build_engine.gate import load_priors_of
        from perception.manifest import load_manifest

        manifest = load_manifest(p.parent / "manifest.json", verify_checksums=False)
        check_classes(ds.classes, manifest.classes, data_dir)
        pre = manifest.preprocess
        post = dataclasses.replace(manifest.postprocess, score_threshold=score_threshold)
        priors = load_priors_of(manifest.postprocess, p.parent)
    else:  # a bare export: its layout read off its output names (the default YOLO head's otherwise)
        from perception.manifest.schema import PostprocessSpec

        post = PostprocessSpec(output_layout=_layout_of_outputs(p), score_threshold=score_threshold)
    run, close = onnx_runner(p)
    try:
        return evaluate_runner(run, ds, size, score_threshold, progress=progress, post=post, pre=pre, priors=priors)
    finally:
        close()


def write_report(
    out_dir: str | os.PathLike[str], report: KpiReport, predictions: list[dict[str, Any]] | None = None
) -> Path:
    """``out_dir/kpi.json`` (+ results.json) and the PNG plots."""
    from build_engine.plots import write_plots

    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    (d / "kpi.json").write_text(json.dumps(report.to_dict(), indent=1))
    if predictions is not None:
        (d / "results.json").write_text(json.dumps(predictions))
    write_plots(report, d)
    return d
