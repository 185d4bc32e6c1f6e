"""results.csv with distillation: the detection loss and the GAM-weighted distillation term apart, so
results.png does not draw a rising lambda as a diverging loss; the time column and its resume."""
import pytest

from pipeline.train import outputs


def test_results_row_separates_detection_loss_and_distillation(tmp_path):
    means = {"loss": 30.0, "loss_mal": 1.0, "loss_mal_aux_0": 1.1, "loss_distill": 12.0, "distill_weight": 24.0,
             "lr": 2e-4, "samples_per_s": 3.0}
    row = outputs.results_row(3, means, 1e-4, {"AP": 0.1, "AP50": 0.3, "ARs": 0.2}, seconds=75.0)
    assert list(row) == ["epoch", "train/loss", "train/loss_mal", "train/loss_distill", "train/loss_det",
                         "train/distill_weight", "lr", "val/AP", "val/AP50", "time"]
    assert row["train/loss_det"] == 18.0 and row["train/distill_weight"] == 24.0 and row["lr"] == 2e-4
    kd = outputs.results_row(0, {"loss": 9.0, "loss_kd_logit": 2.0, "loss_kd_box": 3.0}, 1e-4, {}, seconds=1.0)
    assert kd["train/loss_det"] == 4.0 and "train/distill_weight" not in kd   # RT-CO-DETR: no lambda
    plain = outputs.results_row(0, {"loss": 9.0, "loss_giou": 2.0}, 1e-4, {}, seconds=1.0)
    assert "train/loss_det" not in plain and plain["lr"] == 1e-4

    res = outputs.Results(tmp_path)
    for epoch, (distill, lam) in enumerate([(5.0, 5.0), (20.0, 40.0), (30.0, 120.0)]):   # lambda x DSI rises
        res.add(outputs.results_row(epoch, {"loss": 20.0 - epoch + distill, "loss_distill": distill,
                                            "distill_weight": lam}, 1e-4, {"AP": 0.1}, seconds=10.0 * (epoch + 1)))
    series = outputs.panels(outputs.read_results(tmp_path / outputs.RESULTS))
    assert "train/loss" not in series and "time" not in series                 # the total is not drawn
    assert series["train/loss_det"] == [20.0, 19.0, 18.0]                       # falls while the total rises
    assert series["train/dsi"] == pytest.approx([1.0, 0.5, 0.25])              # unweighted DSI falls too
    assert list(series).index("train/dsi") == list(series).index("train/loss_distill") + 1
    assert (tmp_path / "results.png").stat().st_size > 1000
    assert outputs.last_time(tmp_path / outputs.RESULTS) == 30.0 and outputs.last_time(tmp_path / "none.csv") == 0.0
