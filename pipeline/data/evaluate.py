"""COCO box metrics (AP, AP50, AP75, APs/m/l, AR1/10/100, ARs/m/l) for postprocessed detections.

Reproduces the official RT-DETR ``CocoEvaluator``: detections are converted to COCO result
dicts (xywh pixels, contiguous label mapped back to the dataset's category id), accumulated over
batches, gathered to every rank under DDP, and scored with COCOeval restricted to the images that
were actually evaluated (``params.imgIds`` = the ids seen by ``update``, as in the official code).

Protocol: the official post-processor's detections (top-300 (query, class) pairs, no NMS) with
boxes **not clipped** to the image, as the official ``PostProcessor`` leaves them;
:func:`protocol_postprocessor` builds it for every evaluation (``jobs.evaluate``, the trainer's
per-epoch one). Clipping (``clip_boxes=True``, what the deploy graph and ``jobs.predict`` output)
only raises the IoU of a box that overhangs the image with a ground truth inside it, so it can only
raise AP; ``jobs.evaluate --clip-boxes`` scores that variant (the difference on TACO:
docs/measured.md).

Backend: ``faster-coco-eval`` (C++ COCOeval) by default. ``benchmarks/coco_eval.py`` checks it
gives the same 12 numbers as ``pycocotools`` on generated data and measures the speed ratio;
``backend="pycocotools"`` selects the reference implementation.
"""
from __future__ import annotations

import contextlib
import copy
import io
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.distributed as dist
from torchvision.ops import box_convert

from detector.postprocessor import PostProcessor
from pipeline.data.dataset import read_json

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
BACKENDS = ("faster-coco-eval", "pycocotools")


def _coco_api(backend: str):
    """(COCO, COCOeval) classes of a backend."""
    if backend == "faster-coco-eval":
        from faster_coco_eval import COCO, COCOeval_faster

        return COCO, COCOeval_faster
    if backend == "pycocotools":
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        return COCO, COCOeval
    raise ValueError(f"unknown COCO evaluation backend {backend!r}; choose one of {BACKENDS}")


def protocol_postprocessor(num_classes: int, clip_boxes: bool = False, num_top_queries: int = 300) -> PostProcessor:
    """The post-processor of the evaluation protocol: the official one (top-300, no NMS, boxes not
    clipped); ``clip_boxes=True`` scores the boxes as deployment outputs them (clipped to the image)."""
    return PostProcessor(num_classes=num_classes, num_top_queries=num_top_queries, clip_boxes=clip_boxes)


def load_ground_truth(gt) -> dict:
    """A COCO ground-truth dict from a dict, a ``COCO`` object or an instances json path."""
    if hasattr(gt, "dataset") and isinstance(gt.dataset, Mapping):  # pycocotools / faster-coco-eval COCO
        gt = gt.dataset
    if not isinstance(gt, Mapping):
        gt = read_json(gt)
    missing = {"images", "annotations", "categories"} - set(gt)
    if missing:
        raise ValueError(f"COCO ground truth lacks {sorted(missing)}: give an instances_*.json style dict")
    return dict(gt)


def detections_to_coco(
    predictions: Sequence[Mapping[str, torch.Tensor]],
    image_ids: Sequence[int] | torch.Tensor,
    label_to_category: Sequence[int] | Mapping[int, int] | None = None,
) -> list[dict]:
    """COCO result dicts from PostProcessor outputs ({labels, boxes xyxy pixels, scores} per image)."""
    if len(predictions) != len(image_ids):
        raise ValueError(f"{len(predictions)} predictions for {len(image_ids)} image ids")
    results = []
    for pred, image_id in zip(predictions, image_ids):
        boxes = torch.as_tensor(pred["boxes"]).detach().float().cpu().reshape(-1, 4)
        xywh = box_convert(boxes, "xyxy", "xywh").tolist()
        labels = torch.as_tensor(pred["labels"]).detach().cpu().reshape(-1).tolist()
        scores = torch.as_tensor(pred["scores"]).detach().float().cpu().reshape(-1).tolist()
        if label_to_category is not None:
            labels = [int(label_to_category[lab]) for lab in labels]
        results += [
            {"image_id": int(image_id), "category_id": int(c), "bbox": b, "score": float(s)}
            for c, b, s in zip(labels, xywh, scores)
        ]
    return results


def coco_eval(
    gt: dict, results: list[dict], image_ids: Sequence[int] | None = None,
    backend: str = "faster-coco-eval", verbose: bool = False,
) -> dict[str, float]:
    """The 12 COCO bbox statistics of ``results`` against ``gt`` (restricted to ``image_ids``)."""
    return stats_of(run_cocoeval(gt, results, image_ids, backend, verbose))


def stats_of(evaluator) -> dict[str, float]:
    return dict(zip(STAT_NAMES, (float(s) for s in evaluator.stats[: len(STAT_NAMES)])))


def run_cocoeval(gt: dict, results: list[dict], image_ids: Sequence[int] | None = None,
                 backend: str = "faster-coco-eval", verbose: bool = False):
    """The evaluated, accumulated and summarised COCOeval object (its ``eval['precision']``,
    ``cocoGt`` and ``cocoDt`` feed the PR curve and the confusion matrix)."""
    COCO, COCOeval = _coco_api(backend)
    quiet = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
    with quiet:
        coco_gt = COCO()
        coco_gt.dataset = copy.deepcopy(gt)
        coco_gt.createIndex()
        unknown = ({r["image_id"] for r in results} | set(image_ids or [])) - set(coco_gt.getImgIds())
        if unknown:
            raise ValueError(f"image ids not in the ground truth: {sorted(unknown)[:5]} "
                             "(pass the annotations of the evaluated split)")
        coco_dt = _load_results(COCO, coco_gt, copy.deepcopy(results))
        kwargs = {"print_function": print} if backend == "faster-coco-eval" else {}
        evaluator = COCOeval(coco_gt, coco_dt, "bbox", **kwargs)
        if image_ids is not None:
            evaluator.params.imgIds = sorted({int(i) for i in image_ids})
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator


def _load_results(COCO, coco_gt, results: list[dict]):
    """coco_gt.loadRes, also for an empty result list (pycocotools' loadRes fails on [])."""
    if results:
        return coco_gt.loadRes(results)
    coco_dt = COCO()
    coco_dt.dataset = {"images": list(coco_gt.dataset["images"]), "annotations": [],
                       "categories": copy.deepcopy(coco_gt.dataset["categories"])}
    coco_dt.createIndex()
    return coco_dt


def format_table(stats: Mapping[str, float]) -> str:
    """A two-row text table of the statistics (values in percent)."""
    names = [n for n in STAT_NAMES if n in stats]
    head = " ".join(f"{n:>6}" for n in names)
    row = " ".join(f"{100 * stats[n]:6.2f}" for n in names)
    return f"{head}\n{row}"


class CocoEvaluator:
    """Accumulates detections over batches and computes COCO bbox metrics.

    ``update(predictions, image_ids)`` takes the PostProcessor output of one batch and the
    images' COCO ids; ``summarize()`` gathers every rank's results (``all_gather_object`` when
    torch.distributed is initialised) and returns the same statistics on every rank.
    """

    def __init__(
        self, gt: dict | str | Path,
        label_to_category: Sequence[int] | Mapping[int, int] | None = None,
        backend: str = "faster-coco-eval",
    ):
        _coco_api(backend)  # fail early on a bad name
        self.gt = load_ground_truth(gt)
        self.label_to_category = label_to_category
        self.backend = backend
        self.reset()

    def reset(self) -> None:
        self.per_image: dict[int, list[dict]] = {}
        self.cocoeval = None    # the last summarize()'s COCOeval (precision arrays, scored gt / detections)

    def update(self, predictions: Sequence[Mapping[str, torch.Tensor]], image_ids) -> None:
        ids = [int(i) for i in torch.as_tensor(image_ids).reshape(-1).tolist()]
        for pred, image_id in zip(predictions, ids, strict=True):
            # a padded DistributedSampler repeats images: each image id counts once
            self.per_image[image_id] = detections_to_coco([pred], [image_id], self.label_to_category)

    def _gathered(self) -> dict[int, list[dict]]:
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self.per_image
        parts: list = [None] * dist.get_world_size()
        dist.all_gather_object(parts, self.per_image)
        merged: dict[int, list[dict]] = {}
        for part in parts:
            for image_id, results in part.items():
                merged.setdefault(image_id, results)
        return merged

    def summarize(self, verbose: bool = False) -> dict[str, float]:
        per_image = self._gathered()
        if not per_image:
            raise RuntimeError("CocoEvaluator.summarize() before any update(): nothing was evaluated")
        results = [r for image_id in sorted(per_image) for r in per_image[image_id]]
        self.cocoeval = run_cocoeval(self.gt, results, sorted(per_image), self.backend, verbose)
        return stats_of(self.cocoeval)


@torch.no_grad()
def evaluate_detector(model, postprocessor, loader, evaluator: CocoEvaluator, device="cpu",
                      progress: bool = True) -> dict[str, float]:
    """Runs ``model`` over ``loader`` (images [B,3,H,W] in [0,1], targets with image_id and
    orig_size (w, h)), postprocesses to original-image pixels and returns the COCO statistics."""
    from tqdm.auto import tqdm

    model.eval()
    evaluator.reset()
    show = progress and not (dist.is_available() and dist.is_initialized() and dist.get_rank() > 0)
    for images, targets in tqdm(loader, desc="evaluate", unit="batch", disable=not show):
        outputs = model(images.to(device))
        sizes = torch.stack([torch.as_tensor(t["orig_size"]) for t in targets]).to(device)
        evaluator.update(postprocessor(outputs, sizes), [int(t["image_id"]) for t in targets])
    return evaluator.summarize(verbose=show)
