"""COCO evaluation: perfect detections give AP 1, numbers match pycocotools, DDP gathering."""
import os
import tempfile

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from pipeline.data.evaluate import STAT_NAMES, CocoEvaluator, coco_eval, detections_to_coco

CATEGORY_IDS = [1, 3, 7, 12]  # non-contiguous, as in COCO


def make_gt(num_images=12, seed=0):
    rng = np.random.default_rng(seed)
    images, anns = [], []
    for i in range(num_images):
        image_id = 100 + 3 * i  # ids unrelated to positions
        images.append({"id": image_id, "width": 320, "height": 240})
        for _ in range(int(rng.integers(1, 6))):
            w, h = rng.uniform(5, 150), rng.uniform(5, 120)
            x, y = rng.uniform(0, 320 - w), rng.uniform(0, 240 - h)
            anns.append({"id": len(anns) + 1, "image_id": image_id, "iscrowd": 0, "area": w * h,
                         "category_id": int(rng.choice(CATEGORY_IDS)), "bbox": [x, y, w, h]})
    cats = [{"id": c, "name": str(c)} for c in CATEGORY_IDS]
    return {"images": images, "annotations": anns, "categories": cats}


def predictions_from_gt(gt, noise=0.0, extra=0, seed=0):
    """Per-image PostProcessor-style dicts (contiguous labels, xyxy pixels) built from the GT."""
    rng = np.random.default_rng(seed)
    preds, ids = [], []
    for img in gt["images"]:
        anns = [a for a in gt["annotations"] if a["image_id"] == img["id"]]
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float64)
        boxes[:, 2:] += boxes[:, :2]
        boxes += torch.from_numpy(rng.normal(0, noise, boxes.shape)) * 20
        labels = torch.tensor([CATEGORY_IDS.index(a["category_id"]) for a in anns])
        scores = torch.from_numpy(rng.uniform(0.5, 1.0, len(anns)))
        if extra:
            xy = torch.from_numpy(rng.uniform(0, 200, (extra, 2)))
            boxes = torch.cat([boxes, torch.cat([xy, xy + 40], 1)])
            labels = torch.cat([labels, torch.from_numpy(rng.integers(0, 4, extra))])
            scores = torch.cat([scores, torch.from_numpy(rng.uniform(0, 0.6, extra))])
        preds.append({"labels": labels, "boxes": boxes.float(), "scores": scores.float()})
        ids.append(img["id"])
    return preds, ids


def pycocotools_stats(gt, results):
    coco_gt = COCO()
    coco_gt.dataset = gt
    coco_gt.createIndex()
    ev = COCOeval(coco_gt, coco_gt.loadRes(results), "bbox")
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    return np.array(ev.stats)


@pytest.mark.parametrize("backend", ["faster-coco-eval", "pycocotools"])
def test_ground_truth_as_detections_gives_ap_one(backend):
    gt = make_gt()
    preds, ids = predictions_from_gt(gt)
    ev = CocoEvaluator(gt, label_to_category=CATEGORY_IDS, backend=backend)
    ev.update(preds[:5], ids[:5])
    ev.update(preds[5:], torch.tensor(ids[5:]))
    stats = ev.summarize()
    assert stats["AP"] == pytest.approx(1.0) and stats["AP50"] == pytest.approx(1.0)
    assert stats["AR100"] == pytest.approx(1.0)


def test_matches_pycocotools_on_perturbed_detections():
    gt = make_gt(num_images=30, seed=1)
    preds, ids = predictions_from_gt(gt, noise=0.15, extra=8, seed=2)
    ev = CocoEvaluator(gt, label_to_category=CATEGORY_IDS)
    ev.update(preds, ids)
    ours = ev.summarize()
    ref = pycocotools_stats(gt, detections_to_coco(preds, ids, CATEGORY_IDS))
    assert 0.05 < ours["AP"] < 0.95  # neither trivial nor perfect
    np.testing.assert_allclose([ours[k] for k in STAT_NAMES], ref, atol=1e-12)


def test_repeated_images_count_once_and_subset_restricts_ids():
    gt = make_gt()
    preds, ids = predictions_from_gt(gt, noise=0.1, seed=3)
    ev = CocoEvaluator(gt, label_to_category=CATEGORY_IDS)
    ev.update(preds[:4], ids[:4])
    ev.update(preds[:2], ids[:2])  # padded sampler repeats
    once = CocoEvaluator(gt, label_to_category=CATEGORY_IDS)
    once.update(preds[:4], ids[:4])
    assert ev.summarize() == once.summarize()
    # only the 4 evaluated images count: their perfect predictions give AP 1
    perfect, _ = predictions_from_gt(gt)
    sub = CocoEvaluator(gt, label_to_category=CATEGORY_IDS)
    sub.update(perfect[:4], ids[:4])
    assert sub.summarize()["AP"] == pytest.approx(1.0)


def test_empty_detections_and_bad_input():
    gt = make_gt()
    _, ids = predictions_from_gt(gt)
    empty = [{"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4),
              "scores": torch.zeros(0)}] * len(ids)
    for backend in ("faster-coco-eval", "pycocotools"):
        stats = coco_eval(gt, detections_to_coco(empty, ids), ids, backend=backend)
        assert stats["AP"] == 0 and stats["AR100"] == 0
    ev = CocoEvaluator(gt)
    with pytest.raises(RuntimeError, match="before any update"):
        ev.summarize()
    ev.update(empty[:1], [999999])
    with pytest.raises(ValueError, match="not in the ground truth"):
        ev.summarize()
    with pytest.raises(ValueError, match="unknown COCO evaluation backend"):
        CocoEvaluator(gt, backend="hotcoco?")
    with pytest.raises(ValueError, match="lacks"):
        CocoEvaluator({"images": []})


def _ddp_worker(rank, world, init_file, gt, preds, ids, out):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    ev = CocoEvaluator(gt, label_to_category=CATEGORY_IDS)
    ev.update(preds[rank::world], ids[rank::world])
    stats = ev.summarize()
    torch.save(stats, f"{out}.{rank}")
    dist.destroy_process_group()


def test_ddp_gathers_all_ranks():
    gt = make_gt(num_images=10, seed=4)
    preds, ids = predictions_from_gt(gt, noise=0.1, extra=3, seed=5)
    single = CocoEvaluator(gt, label_to_category=CATEGORY_IDS)
    single.update(preds, ids)
    expected = single.summarize()
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "stats")
        mp.spawn(_ddp_worker, args=(2, os.path.join(tmp, "init"), gt, preds, ids, out), nprocs=2)
        for rank in range(2):
            assert torch.load(f"{out}.{rank}") == expected


def test_protocol_scores_boxes_unclipped_as_the_official_postprocessor():
    """A box overhanging the image (x from -15 px) on a ground truth touching its edge: the official
    protocol scores IoU 900/1350 = 0.67 (AP at 4 of the 10 thresholds), clipped to the image it is 1."""
    from pipeline.data.evaluate import protocol_postprocessor
    gt = {"images": [{"id": 1, "width": 100, "height": 100, "file_name": "a.jpg"}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 4, "bbox": [0, 10, 30, 30], "area": 900,
                           "iscrowd": 0}],
          "categories": [{"id": 4, "name": "a"}]}
    outputs = {"pred_logits": torch.tensor([[[5.0]]]), "pred_boxes": torch.tensor([[[0.075, 0.25, 0.45, 0.30]]])}
    stats = {}
    for clip in (False, True):
        evaluator = CocoEvaluator(gt, label_to_category=[4])
        post = protocol_postprocessor(1, clip_boxes=clip, num_top_queries=1)
        evaluator.update(post(outputs, torch.tensor([[100, 100]])), [1])
        stats[clip] = evaluator.summarize()
    assert not protocol_postprocessor(3).clip_boxes and protocol_postprocessor(3).num_top_queries == 300
    assert stats[False]["AP50"] == pytest.approx(1.0) and stats[False]["AP"] == pytest.approx(0.4)
    assert stats[True]["AP"] == pytest.approx(1.0)
