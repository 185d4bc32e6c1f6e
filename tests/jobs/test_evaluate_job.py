"""jobs.evaluate end to end on the generated data with a random-initialised RT-DETRv4-S checkpoint."""
import json

import pytest
import torch

from pipeline.data.load import load_dataset


def test_evaluate_job_writes_metrics(tmp_path):
    from detector import build_detector
    from detector.checkpoint import save_checkpoint
    from jobs.evaluate import main
    from pipeline.data.evaluate import STAT_NAMES

    classes = load_dataset(None, split="val").num_classes
    save_checkpoint(build_detector("s", num_classes=classes), tmp_path / "model.pth")
    stats = main(["--checkpoint", str(tmp_path / "model.pth"), "--split", "val", "--size", "s", "--limit", "3",
                  "--batch-size", "2", "--workers", "0", "--image-size", "320", "--out", str(tmp_path / "eval")])
    record = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert set(record["stats"]) == set(STAT_NAMES) and record["images"] == 3
    assert record["stats"] == pytest.approx(stats)
    assert all(-1 <= v <= 1 for v in stats.values())
    save_checkpoint(build_detector("s", num_classes=classes + 1), tmp_path / "other.pth")
    with pytest.raises(ValueError, match="different number of classes"):
        main(["--checkpoint", str(tmp_path / "other.pth"), "--split", "val", "--limit", "1", "--workers", "0"])


class Oracle(torch.nn.Module):
    """Stands in for the detector: emits each image's ground truth (normalised cxcywh) as queries."""

    def __init__(self, targets, num_classes, queries=60):
        super().__init__()
        self.targets, self.num_classes, self.queries = list(targets), num_classes, queries

    def forward(self, images):
        logits = torch.full((len(images), self.queries, self.num_classes), -10.0)
        boxes = torch.full((len(images), self.queries, 4), 0.05)
        for b in range(len(images)):
            t = self.targets.pop(0)
            n = len(t["labels"])
            logits[b, torch.arange(n), t["labels"]] = 10.0
            boxes[b, :n] = t["boxes"]
        return {"pred_logits": logits, "pred_boxes": boxes}


def test_evaluation_loop_maps_boxes_and_labels_back():
    """Ground truth through the val view, PostProcessor (w, h) scaling and the label map gives AP 1."""
    from detector.postprocessor import PostProcessor
    from pipeline.data.augment import AugmentedDataset
    from pipeline.data.collate import stack_collate
    from pipeline.data.evaluate import CocoEvaluator, evaluate_detector

    dataset = load_dataset(None, split="val")
    val = torch.utils.data.Subset(AugmentedDataset(dataset, policy=None, size=64), range(12))
    assert {tuple(dataset[i][1]["orig_size"].tolist()) for i in range(12)} == {(320, 320), (320, 240)}
    model = Oracle([val[i][1] for i in range(len(val))], dataset.num_classes)
    loader = torch.utils.data.DataLoader(val, batch_size=5, collate_fn=stack_collate)
    evaluator = CocoEvaluator(dataset.coco, dataset.label_to_category_id)
    stats = evaluate_detector(model, PostProcessor(dataset.num_classes), loader, evaluator, progress=False)
    assert stats["AP"] == pytest.approx(1.0, abs=1e-6) and stats["AR100"] == pytest.approx(1.0, abs=1e-6)
