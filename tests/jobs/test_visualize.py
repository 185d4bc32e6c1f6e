"""jobs.visualize: PCA maps of teacher tokens and projected student F5 from a training checkpoint."""
from __future__ import annotations

import pytest
import torch

from detector import build_detector
from detector.checkpoint import REGENERATED
from detector.dsi import DSI, DSIConfig
from jobs.visualize import main
from pipeline.data.synthetic import ensure_generated
from pipeline.train.feature_maps import pca_rgb


def test_pca_rgb_shares_the_teacher_basis():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(16, 4, 5, generator=g, dtype=torch.float64)
    t_rgb, s_rgb = pca_rgb(t, t.clone())
    assert t_rgb.shape == (3, 4, 5) and torch.equal(t_rgb, s_rgb)       # same features, same colours
    assert 0 <= t_rgb.min() and t_rgb.max() <= 1
    _, flipped = pca_rgb(t, -t)
    assert not torch.allclose(flipped, t_rgb)


def test_visualize_writes_one_panel_per_image(tmp_path):
    detector = build_detector("s", num_classes=6)
    dsi = DSI(DSIConfig(student_dim=detector.cfg.hidden_dim, teacher_dim=384))   # ViT-S width
    ckpt = tmp_path / "last.pth"
    weights = {k: v for k, v in detector.state_dict().items() if k not in REGENERATED}   # rebuilt on load
    torch.save({"size": "s", "num_classes": 6, "config": {"vfm": "dinov3_vits", "img_size": 128, "weights": None},
                "ema": {"module": weights}, "dsi": dsi.state_dict()}, ckpt)
    images = ensure_generated("val") / "val"
    with pytest.warns(UserWarning, match="RANDOMLY INITIALISED"):
        written = main(["--checkpoint", str(ckpt), "--images", str(images), "--limit", "2", "--out", str(tmp_path / "f")])
    assert [w.name for w in written] == ["000000_features.png", "000001_features.png"]
    assert all(w.stat().st_size > 5000 for w in written)
    weights_only = tmp_path / "best.pth"
    torch.save({"size": "s", "num_classes": 6, "ema": {"module": weights}}, weights_only)
    with pytest.raises(ValueError, match="no DSI projector"):
        main(["--checkpoint", str(weights_only), "--images", str(images)])
