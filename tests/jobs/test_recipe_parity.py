"""benchmarks.recipe_parity on our side alone (2 epochs x 3 steps, two seeds): the per-epoch record the
comparison with the official run reads (AP, loss means, lr, GAM lambda, EMA decay, reloads) and its table.
The official side needs an official checkout (``--official-src``) and is run by hand (docs/training.md)."""
import math

import pytest

from benchmarks import recipe_parity
from pipeline.train.recipe import RECIPES


@pytest.mark.slow
def test_our_side_of_the_parity_harness(tmp_path, capsys):
    result = recipe_parity.main(["--sides", "ours", "--distill", "dsi", "--vfm", "dinov3_vits", "--seeds", "0", "1",
                                 "--epochs", "2", "--train-images", "6", "--batch-size", "2", "--img-size", "192",
                                 "--eval-images", "4", "--jobs", "2", "--device", "cpu", "--out", str(tmp_path)])
    runs = {r["seed"]: r for r in result["modes"]["dsi"]["runs"]}
    assert set(runs) == {0, 1} and all(r["side"] == "ours" for r in runs.values())
    assert runs[0]["init"] != runs[1]["init"]                 # the band's run starts elsewhere
    for run in runs.values():
        epochs = run["epochs"]
        assert [e["epoch"] for e in epochs] == [0, 1] and [e["steps"] for e in epochs] == [3, 3]
        assert epochs[0]["lam"] == RECIPES["s"].gam.lambda0   # GAM's lambda0 in epoch 0, adapted after it
        assert epochs[1]["lam"] != epochs[0]["lam"] and epochs[0]["share"] > 0
        for e, updates in ((0, 3), (1, 6)):                   # ModelEMA: 0.9999 * (1 - exp(-u / 1000))
            assert epochs[e]["ema_decay"] == pytest.approx(0.9999 * (1 - math.exp(-updates / 1000)), rel=1e-9)
        assert all(0.0 <= e["AP"] <= 1.0 and e["reload"] == [] for e in epochs)   # no stage 2 in 2 epochs
        step_means = [sum(x["loss_distill"] for x in e["step_losses"]) / 3 for e in epochs]
        assert [e["losses"]["loss_distill"] for e in epochs] == pytest.approx(step_means)
    out = capsys.readouterr().out
    assert "ep phase" in out and "\n 0 mosaic+mixup" in out and "\n 1 crop" in out and "lambda ours" in out


def test_the_reload_rule_is_the_official_running_best():
    """DetSolver.fit: a stage-2 epoch below the running best since the last reload (stage 1 included)
    reloads best_stg1.pth and empties that best; the APs of the H200 run's official DSI side."""
    aps = [0.0] * 11 + [0.0004, 0.0033, 0.0037, 0.0034, 0.0025, 0.0039]
    events = recipe_parity.reloads_by_rule(aps, stop_epoch=15)
    assert events[15] == [("switch", 13), ("after", 13)] and events[16] == [] and not any(events[:15])
    # no reload after an epoch that follows a reload, a reload after one below the new running best
    assert recipe_parity.reloads_by_rule([0.5, 0.4, 0.45, 0.47, 0.46], stop_epoch=2)[2:] == \
        [[("switch", 0), ("after", 0)], [], [("after", 0)]]
