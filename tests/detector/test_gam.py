import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from detector.gam import GAM, GAM_SIZES, GAMConfig, plot_gam, released_update

S = GAMConfig.for_size("s", stop_epoch=120)   # band [10, 12] %, lambda0 5, default 20


# -- update rule on hand-computed cases -------------------------------------------------------------
def test_sizes_match_release():
    assert [(c.lambda0, c.rho, c.delta, c.default_weight) for c in GAM_SIZES.values()] == [
        (5, 11, 1, 20), (5, 3.5, 0.25, 15), (15, 2, 0.1, 15), (20, 2, 0.25, 20)]


def test_zero_share_resets_to_default():
    assert released_update(0.0, 5.0, 3, S) == (20.0, "reset_to_default_zero_grad")
    assert released_update(5e-7, 5.0, 3, S)[0] == 20.0


def test_stage2_uses_default():
    assert released_update(5.0, 7.0, 120, S) == (20.0, "ema_phase_default")
    assert released_update(5.0, 7.0, 119, S)[1] != "ema_phase_default"


@pytest.mark.parametrize("p", [10.0, 11.0, 12.0])
def test_inside_band_unchanged(p):
    assert released_update(p, 5.0, 1, S) == (5.0, "unchanged")


def test_below_band_targets_upper_edge():
    lam, reason = released_update(5.0, 5.0, 1, S)
    # t = 12 (nearest edge, not rho = 11): ratio = .12*.95 / (.05*.88) = 2.5909...
    assert lam == pytest.approx(5.0 * 0.114 / 0.044)
    assert lam == pytest.approx(12.954545, rel=1e-6)
    assert reason == "adjusted_to_12.00%"


def test_above_band_targets_lower_edge():
    lam, reason = released_update(20.0, 5.0, 1, S)
    assert lam == pytest.approx(5.0 * 0.08 / 0.18)
    assert reason == "adjusted_to_10.00%"


def test_clamps():
    assert released_update(0.1, 5.0, 1, S)[0] == pytest.approx(50.0)   # ratio 136 -> 10x clamp
    assert released_update(99.0, 5.0, 1, S)[0] == pytest.approx(0.5)   # ratio 0.0011 -> 0.1 floor
    assert released_update(100.0, 5.0, 1, S)[0] == pytest.approx(0.5)  # 1-p = 0 -> ratio 0 -> 0.1
    assert released_update(5.0, 1e-7, 1, S) == (1e-7, "unchanged")      # lambda too small


def test_paper_rule_eq11_moves_toward_the_far_edge():
    """Paper Eq. 11 by hand (S: rho 11, delta 1): below the band lambda * (rho + delta) / p, above it
    lambda * (rho - delta) / p; no clamps (the released 10x clamp would give 50 for p = 0.1)."""
    cfg = GAMConfig.for_size("s", rule="paper")
    assert released_update(5.0, 5.0, 1, cfg) == (12.0, "adjusted_to_12.00%")     # 5 * 12 / 5
    assert released_update(20.0, 5.0, 1, cfg) == (2.5, "adjusted_to_10.00%")     # 5 * 10 / 20
    assert released_update(0.1, 5.0, 1, cfg)[0] == pytest.approx(600.0)          # 5 * 12 / 0.1
    assert released_update(11.5, 5.0, 1, cfg) == (5.0, "unchanged")
    assert released_update(0.0, 5.0, 1, cfg) == (20.0, "reset_to_default_zero_grad")
    with pytest.raises(ValueError, match="--gam-rule"):
        released_update(5.0, 5.0, 1, GAMConfig.for_size("s", rule="proportional"))


# -- measurement ---------------------------------------------------------------------------------
class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Linear(4, 4, bias=False)
        self.encoder = nn.Module()
        self.encoder.input_proj = nn.Linear(4, 4, bias=False)
        self.encoder.encoder = nn.ModuleList([nn.Linear(4, 4, bias=False)])
        self.decoder = nn.Linear(4, 4, bias=False)   # no grad in the hand-built case

    def forward(self, x):
        return self.decoder(self.encoder.encoder[0](self.encoder.input_proj(self.backbone(x))))


class Wrapped(nn.Module):      # emulates DDP's ``module.`` prefix
    def __init__(self, m):
        super().__init__()
        self.module = m


def _set_grads(m, bb=1.0, aifi=-0.5, proj=2.0):
    m.backbone.weight.grad = torch.full((4, 4), bb)
    m.encoder.encoder[0].weight.grad = torch.full((4, 4), aifi)
    m.encoder.input_proj.weight.grad = torch.full((4, 4), proj)
    m.decoder.weight.grad = None


@pytest.mark.parametrize("wrap", [0, 1, 2])
def test_share_with_and_without_module_prefix(wrap):
    m = Tiny()
    _set_grads(m)
    gam = GAM(S)
    model = m
    for _ in range(wrap):
        model = Wrapped(model)          # module.encoder..., module.module.encoder...
    share = gam.measure(model)
    assert share.item() == pytest.approx(100 * 8 / (16 + 8 + 32))


def test_extra_modules_count_in_total_only():
    m, proj = Tiny(), nn.Linear(4, 4, bias=False)
    _set_grads(m)
    proj.weight.grad = torch.ones(4, 4)
    assert GAM(S).measure(m, proj).item() == pytest.approx(100 * 8 / (56 + 16))


def test_nonfinite_step_counts_as_zero_or_is_skipped():
    m = Tiny()
    for skip, expected in [(False, 100 * 8 / 56 / 2), (True, 100 * 8 / 56)]:
        gam = GAM(GAMConfig.for_size("s", skip_nonfinite=skip))
        _set_grads(m)
        gam.measure(m)
        _set_grads(m, bb=float("inf"))
        assert gam.measure(m).item() == 0.0
        assert gam.end_epoch(0)["share"] == pytest.approx(expected)


def test_epoch_mean_update_and_history(tmp_path):
    m = Tiny()
    gam = GAM(S)
    _set_grads(m, aifi=-0.5)            # 14.2857 %
    gam.measure(m)
    _set_grads(m, aifi=0.0)             # 0 %
    gam.measure(m)
    rec = gam.end_epoch(0)
    p = 100 * 8 / 56 / 2                # 7.142857 % -> below band -> towards 12 %
    assert rec["share"] == pytest.approx(p)
    expected = 5.0 * (0.12 * (1 - p / 100)) / ((p / 100) * 0.88)
    assert gam.weight == pytest.approx(expected) == pytest.approx(rec["lambda_new"])
    assert rec["lambda_old"] == 5.0 and rec["steps"] == 2
    assert gam.end_epoch(1)["reason"] == "reset_to_default_zero_grad"   # no steps -> share 0
    gam.plot(tmp_path / "gam.png")
    assert (tmp_path / "gam.png").read_bytes()[:4] == b"\x89PNG"


def test_state_round_trip_mid_epoch():
    m = Tiny()
    ref, a = GAM(S), GAM(S)
    for g in (ref, a):
        _set_grads(m, aifi=-0.5)
        g.measure(m)
    b = GAM(S)
    b.load_state_dict(a.state_dict())
    for g in (ref, b):
        _set_grads(m, aifi=-2.0)
        g.measure(m)
    r1, r2 = ref.end_epoch(0), b.end_epoch(0)
    assert r1 == r2
    c = GAM(S)
    c.load_state_dict(b.state_dict())
    assert c.weight == b.weight != S.lambda0 and c.history == b.history


def test_missing_aifi_params_is_an_error():
    with pytest.raises(ValueError, match="encoder.encoder"):
        GAM(S).measure(nn.Linear(2, 2))


def test_plot_gam_function(tmp_path):
    hist = [dict(epoch=e, share=8.0 + e, lambda_old=5.0, lambda_new=5.0 + e, reason="x") for e in range(3)]
    plot_gam(hist, tmp_path / "p.png", band=(10, 12))
    assert (tmp_path / "p.png").stat().st_size > 0


# -- two gloo ranks -------------------------------------------------------------------------------
def _rank(rank, world, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)
    m = Tiny()
    ddp = nn.parallel.DistributedDataParallel(m)
    gam = GAM(S)
    for step in range(3):
        torch.manual_seed(100 * rank + step)          # different data on each rank
        ddp(torch.randn(8, 4)).square().mean().backward()
        gam.measure(ddp)
        ddp.zero_grad(set_to_none=True)
    # measurement on rank-local, NOT all-reduced grads must still give one lambda
    local = GAM(S)
    _set_grads(m, aifi=-0.5 * (rank + 1))
    local.measure(m)
    torch.save(dict(ddp=gam.end_epoch(0), local=local.end_epoch(0)), os.path.join(out_dir, f"{rank}.pt"))
    dist.destroy_process_group()


def test_lambda_identical_across_gloo_ranks(tmp_path):
    # fork: the children reuse the imported torch (spawn re-imports it, ~15 s on a loaded 2-core box)
    mp.start_processes(_rank, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True,
                       start_method="fork")
    r0, r1 = (torch.load(tmp_path / f"{r}.pt") for r in (0, 1))
    assert r0["ddp"] == r1["ddp"]
    assert r0["ddp"]["steps"] == 6
    assert r0["local"]["lambda_new"] == r1["local"]["lambda_new"]
    # the shared statistic is the mean over both ranks' shares: 8/56 and 16/64
    p = (100 * 8 / 56 + 100 * 16 / 64) / 2
    assert r0["local"]["share"] == pytest.approx(p) == r1["local"]["share"]
    assert math.isfinite(r0["ddp"]["lambda_new"])


def test_closed_loop_reaches_band_edge_when_aifi_gradient_scales_with_lambda():
    # the odds-ratio rule assumes AIFI gradient mass grows linearly with lambda: under exactly that
    # model one update lands the share on the nearest band edge, and it then stays unchanged
    m, gam = Tiny(), GAM(S)
    shares = []
    for epoch in range(4):
        for _ in range(3):
            _set_grads(m, aifi=0.01 * gam.weight)        # AIFI L1 = 0.16 * lambda, rest = 48
            gam.measure(m)
        shares.append(gam.end_epoch(epoch)["share"])
    assert shares[0] < 10
    assert shares[1] == pytest.approx(12.0)
    assert [r["reason"] for r in gam.history[1:]] == ["unchanged"] * 3
