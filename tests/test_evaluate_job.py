"""jobs.evaluate end to end on the generated data with a random-initialised RT-DETRv4-S checkpoint."""
import json

import pytest

from pipeline.datasets import load_dataset


def test_evaluate_job_writes_metrics(tmp_path):
    from detector import build_detector
    from detector.checkpoint import save_checkpoint
    from jobs.evaluate import main
    from pipeline.evaluate import STAT_NAMES

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
