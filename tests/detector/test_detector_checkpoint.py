"""load_checkpoint / save_checkpoint: official layouts, our own files, class change, clear errors."""
import logging

import pytest
import torch

from detector import build_detector, load_checkpoint, save_checkpoint
from detector.checkpoint import detect_size
from detector.dsi import DSI, DSIConfig


@pytest.fixture(scope="module")
def source():
    torch.manual_seed(1)
    return build_detector("s")


def _official_state(model, projector=True):
    """The state dict as an official RT-DETRv4 training run writes it (names, int64 reg_scale,
    duplicated up/reg_scale, 640 anchors/valid_mask, DSI projector)."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert state["decoder.reg_scale"].dtype == torch.int64 and "decoder.decoder.up" in state
    state["decoder.anchors"] = torch.zeros(1, 8400, 4)
    state["decoder.valid_mask"] = torch.ones(1, 8400, 1, dtype=torch.bool)
    if projector:
        state["encoder.feature_projector.0.weight"] = torch.randn(768, 256)
        state["encoder.feature_projector.0.bias"] = torch.randn(768)
    return state


def _same_weights(a, b, skip=()):
    sa, sb = a.state_dict(), b.state_dict()
    return all(torch.equal(sa[k], sb[k]) for k in sa if not k.startswith(skip))


@pytest.mark.parametrize("layout", ["model", "ema", "module_prefix"])
def test_official_layouts_load_strictly(source, tmp_path, layout):
    state = _official_state(source)
    if layout == "model":
        obj = {"model": state}
    elif layout == "ema":  # training checkpoint: EMA weights win over the raw model
        obj = {"model": {k: torch.zeros_like(v) for k, v in state.items()}, "ema": {"module": state, "updates": 5},
               "optimizer": {}, "last_epoch": 3}
    else:
        obj = {"model": {f"module.{k}": v for k, v in state.items()}}
    torch.save(obj, tmp_path / "ckpt.pth")
    model = build_detector("s")
    report = load_checkpoint(model, tmp_path / "ckpt.pth")
    assert _same_weights(model, source)
    assert model.decoder.reg_scale.dtype == torch.int64 and model.decoder.reg_scale.item() == 4
    assert report.size == "s" and report.source == ("ema" if layout == "ema" else "model")
    assert report.dropped == ["encoder.feature_projector.0.bias", "encoder.feature_projector.0.weight"]
    assert set(report.regenerated) == {"decoder.anchors", "decoder.valid_mask"}
    assert not report.reinitialised


def test_projector_goes_to_dsi(source, tmp_path):
    state = _official_state(source)
    torch.save({"model": state}, tmp_path / "ckpt.pth")
    dsi = DSI(DSIConfig(student_dim=256, teacher_dim=768))
    report = load_checkpoint(build_detector("s"), tmp_path / "ckpt.pth", dsi=dsi)
    assert report.projector_loaded and not report.dropped
    assert torch.equal(dsi.feature_projector[0].weight, state["encoder.feature_projector.0.weight"])


def test_own_checkpoint_round_trip(source, tmp_path):
    dsi = DSI(DSIConfig())
    path = save_checkpoint(source, tmp_path / "run" / "last.pth", dsi=dsi, epoch=7)
    obj = torch.load(path, weights_only=False)
    assert obj["epoch"] == 7 and obj["config"]["size"] == "s"
    assert obj["model"]["decoder.reg_scale"].dtype == torch.int64 and "decoder.decoder.reg_scale" in obj["model"]
    model, dsi2 = build_detector("s"), DSI(DSIConfig())
    report = load_checkpoint(model, path, dsi=dsi2)
    assert _same_weights(model, source) and report.projector_loaded
    assert torch.equal(dsi2.feature_projector[0].weight, dsi.feature_projector[0].weight)


def test_class_change_reinitialises_only_class_heads(source, tmp_path, caplog):
    torch.save({"model": _official_state(source)}, tmp_path / "coco.pth")
    model = build_detector("s", num_classes=60)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    with caplog.at_level(logging.WARNING, logger="detector.checkpoint"):
        report = load_checkpoint(model, tmp_path / "coco.pth")
    assert "80 classes, model has 60" in caplog.text
    heads = ("decoder.enc_score_head.", "decoder.dec_score_head.", "decoder.denoising_class_embed.")
    assert report.reinitialised and all(k.startswith(heads) for k in report.reinitialised)
    assert len(report.reinitialised) == 2 + 2 * 3 + 1
    sd = model.state_dict()
    for k in report.reinitialised:
        assert torch.equal(sd[k], fresh[k])
    assert _same_weights(model, source, skip=heads + ("decoder.anchors", "decoder.valid_mask"))
    with torch.no_grad():
        assert model.eval()(torch.rand(1, 3, 160, 160))["pred_logits"].shape == (1, 300, 60)


def test_other_size_is_named(source, tmp_path):
    torch.save({"model": _official_state(source)}, tmp_path / "s.pth")
    with torch.device("meta"):
        m = build_detector("m")
    with pytest.raises(ValueError, match=r"RT-DETRv4-S checkpoint but the model is RT-DETRv4-M"):
        load_checkpoint(m, tmp_path / "s.pth")
    assert detect_size(m.state_dict()) == "m"


def test_unknown_format_and_bad_keys(source, tmp_path):
    torch.save({"weights": [1, 2, 3]}, tmp_path / "odd.pth")
    with pytest.raises(ValueError, match="odd.pth: not an RT-DETRv4 checkpoint"):
        load_checkpoint(build_detector("s"), tmp_path / "odd.pth")
    (tmp_path / "text.pth").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="text.pth: cannot be read"):
        load_checkpoint(build_detector("s"), tmp_path / "text.pth")
    state = _official_state(source)
    state.pop("encoder.lateral_convs.0.conv.weight")
    state["decoder.extra.weight"] = torch.zeros(1)
    torch.save({"model": state}, tmp_path / "broken.pth")
    with pytest.raises(ValueError, match=r"missing keys \[encoder.lateral_convs.0.conv.weight\].*"
                                         r"unexpected keys \[decoder.extra.weight\]"):
        load_checkpoint(build_detector("s"), tmp_path / "broken.pth")


def test_detector_from_checkpoint(source, tmp_path):
    from detector.checkpoint import detector_from_checkpoint
    torch.save({"ema": {"module": _official_state(source), "updates": 1}}, tmp_path / "official.pth")
    model = detector_from_checkpoint(tmp_path / "official.pth")
    assert model.cfg.size == "s" and model.cfg.num_classes == 80 and _same_weights(model, source)
    small = build_detector("s", num_classes=6, num_queries=100)
    save_checkpoint(small, tmp_path / "ours.pth")
    model = detector_from_checkpoint(tmp_path / "ours.pth")
    assert (model.cfg.num_classes, model.cfg.num_queries) == (6, 100) and _same_weights(model, small)
