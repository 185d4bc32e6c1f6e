"""FDR helpers: the weighting function W(n), distance2bbox / bbox2distance, checked against outputs of the
official engine/rtv4/dfine_utils.py stored in tests/fixtures/decoder_parity_misc.pt and by round trips."""
from pathlib import Path

import pytest
import torch

from detector import fdr

REF = Path(__file__).resolve().parents[1] / "fixtures" / "decoder_parity_misc.pt"
UP = torch.tensor([0.5])


def fdr_inputs():
    """64 reference boxes (cxcywh) and targets (xyxy); some targets fall outside the W(n) range."""
    g = torch.Generator().manual_seed(5)
    n = 64
    points = torch.cat([0.2 + 0.6 * torch.rand(n, 2, generator=g), 0.05 + 0.5 * torch.rand(n, 2, generator=g)], -1)
    cxcywh = torch.cat([points[:, :2] + 0.1 * torch.randn(n, 2, generator=g),
                        points[:, 2:] * (0.3 + 2.5 * torch.rand(n, 2, generator=g))], -1)
    x1y1 = cxcywh[:, :2] - cxcywh[:, 2:] / 2
    return points, torch.cat([x1y1, x1y1 + cxcywh[:, 2:]], -1)


@pytest.mark.parametrize("reg_scale", [4, 8])
def test_weighting_function_matches_official(reg_scale):
    ref = torch.load(REF)
    rs = torch.tensor([reg_scale])
    w = fdr.weighting_function(32, UP, rs)
    assert torch.equal(w, ref[f"weighting_{reg_scale}"])
    assert torch.equal(fdr.weighting_function(32, UP, rs, deploy=True), ref[f"weighting_deploy_{reg_scale}"])
    # Shape of W(n): 33 bins, zero in the middle, +-2*up*reg_scale at the ends, odd and increasing.
    assert w.shape == (33,) and w[16] == 0 and w[0] == -2 * 0.5 * reg_scale and w[-1] == 2 * 0.5 * reg_scale
    assert torch.allclose(w, -w.flip(0)) and bool((w.diff() > 0).all())


@pytest.mark.parametrize("reg_scale", [4, 8])
def test_bbox2distance_matches_official(reg_scale):
    points, boxes = fdr_inputs()
    got = torch.stack(fdr.bbox2distance(points, boxes, 32, torch.tensor([reg_scale]), UP))
    torch.testing.assert_close(got, torch.load(REF)[f"bbox2distance_{reg_scale}"], atol=1e-6, rtol=0)


def test_distance_round_trip():
    """Interpolating W(n) with the bbox2distance weights and decoding gives back the target box."""
    points, boxes = fdr_inputs()
    reg_scale = torch.tensor([4])
    index, w_right, w_left = fdr.bbox2distance(points, boxes, 32, reg_scale, UP)
    w = fdr.weighting_function(32, UP, reg_scale)
    left = index.floor().long()
    offsets = (w[left] * w_left + w[(left + 1).clamp(max=32)] * w_right).reshape(-1, 4)
    inside = ((w_right > 0) & (w_right < 1)).reshape(-1, 4).all(-1)
    assert inside.sum() > 30
    decoded = fdr.distance2bbox(points, offsets, reg_scale)
    x1y1 = decoded[:, :2] - decoded[:, 2:] / 2
    torch.testing.assert_close(torch.cat([x1y1, x1y1 + decoded[:, 2:]], -1)[inside], boxes[inside], atol=1e-5, rtol=0)


def test_integral_is_expectation():
    w = fdr.weighting_function(32, UP, torch.tensor([4]))
    corners = torch.full((2, 3, 4 * 33), -1e4)
    corners.view(2, 3, 4, 33)[..., 20] = 0.0  # all mass on bin 20
    assert torch.allclose(fdr.integral(corners, w, 32), w[20].expand(2, 3, 4))
