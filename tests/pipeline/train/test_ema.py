import math

import pytest
import torch
from torch import nn

from pipeline.train.ema import ModelEMA


def _model():
    m = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    with torch.no_grad():
        for p in m.parameters():
            p.zero_()
    return m


def test_warmup_formula():
    ema = ModelEMA(_model())
    for u in (1, 10, 1000, 10**6):
        assert ema.decay_at(u) == pytest.approx(0.9999 * (1 - math.exp(-u / 1000)))


def test_update_averages_params_and_float_buffers():
    m = _model()
    ema = ModelEMA(m, decay=0.9, warmups=10)
    with torch.no_grad():
        for p in m.parameters():
            p.fill_(1.0)
    m[1].running_mean.fill_(2.0)
    m[1].num_batches_tracked.fill_(7)
    ema.update(m)
    d1 = 0.9 * (1 - math.exp(-1 / 10))
    ema.update(m)
    d2 = 0.9 * (1 - math.exp(-2 / 10))
    expected = d2 * (1 - d1) + (1 - d2)
    assert ema.module[0].weight[0, 0].item() == pytest.approx(expected)
    # running_mean starts at 0 in the copy, running_var at 1 in both
    assert ema.module[1].running_mean[0].item() == pytest.approx(2 * expected)
    assert ema.module[1].running_var[0].item() == pytest.approx(1.0)
    assert ema.module[1].num_batches_tracked.item() == 0   # integer buffer untouched (official)
    assert ema.updates == 2


def test_decay_change_takes_effect():
    m = _model()
    ema = ModelEMA(m, decay=0.9999, warmups=0)
    ema.decay = 0.5                          # official: ignored because of a closure
    with torch.no_grad():
        m[0].weight.fill_(1.0)
    ema.update(m)
    assert ema.module[0].weight[0, 0].item() == pytest.approx(0.5)


def test_start_skips_updates_and_state_round_trip():
    m = _model()
    ema = ModelEMA(m, start=2)
    with torch.no_grad():
        m[0].weight.fill_(1.0)
    ema.update(m)
    ema.update(m)
    assert ema.updates == 0 and ema.module[0].weight.abs().sum() == 0
    ema.update(m)
    ema.decay = 0.9998
    other = ModelEMA(_model())
    other.load_state_dict(ema.state_dict())
    assert other.updates == 1 and other.decay == 0.9998 and other.before_start == 2
    assert torch.equal(other.module[0].weight, ema.module[0].weight)
    assert not any(p.requires_grad for p in other.module.parameters())


def test_unwraps_ddp_like_wrapper():
    class Wrap(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.module = m
    m = _model()
    ema = ModelEMA(Wrap(m))
    ema.update(Wrap(m))
    assert set(ema.module.state_dict()) == set(m.state_dict())
