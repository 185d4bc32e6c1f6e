"""RTDETRv4 build / forward / backward for every size, input validation, parameter counts."""
import pytest
import torch

from detector import SIZES, build_detector, get_config

# Official numbers (reference §1.1, official code instantiated through its YAMLConfig): training graph
# incl. the DSI projector, minus the projector (which lives in detector/dsi.py here); deploy graph.
OFFICIAL_TRAIN_PARAMS = {"s": 10_519_253 - 197_376, "m": 19_787_440 - 197_376,
                         "l": 31_487_224 - 197_376, "x": 63_011_160 - 295_680}
OFFICIAL_DEPLOY_MPARAMS = {"s": 10.24, "m": 19.25, "l": 30.77, "x": 61.70}


def _targets(batch):
    return [{"labels": torch.tensor([1, 3]), "boxes": torch.tensor([[0.5, 0.5, 0.3, 0.4], [0.2, 0.3, 0.1, 0.1]])}
            for _ in range(batch)]


@pytest.mark.parametrize("size", ["s", "m", "l", "x"])
def test_forward_backward_every_size(size):
    model = build_detector(size, num_classes=5).train()
    batch = 2 if size in "sm" else 1  # 128x160 is the smallest input with >= 300 anchors
    images = torch.rand(batch, 3, 128, 160)
    out = model(images, _targets(batch))
    hidden = get_config(size).hidden_dim
    assert out["pred_logits"].shape == (batch, 300, 5) and out["pred_boxes"].shape == (batch, 300, 4)
    assert out["aifi_feature"].shape == (batch, hidden, 4, 5)
    assert len(out["aux_outputs"]) == SIZES[size].num_decoder_layers - 1 and "dn_outputs" in out
    loss = out["pred_logits"].sigmoid().mean() + out["pred_boxes"].mean() + out["aifi_feature"].pow(2).mean()
    loss.backward()
    for name in ("backbone.stem.stem1.conv.weight", "encoder.encoder.0.layers.0.linear1.weight",
                 "encoder.pan_blocks.1.cv4.conv.weight", f"decoder.dec_score_head.{SIZES[size].num_decoder_layers - 1}.weight"):
        grad = model.get_parameter(name).grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name

    model.eval()
    with torch.no_grad():
        out = model(images[:1])
    assert set(out) == {"pred_logits", "pred_boxes"} and out["pred_boxes"].shape == (1, 300, 4)


def test_official_module_names():
    model = build_detector("s")
    keys = model.state_dict().keys()
    for k in ("backbone.stem.stem1.lab.scale", "encoder.input_proj.2.norm.running_var",
              "encoder.encoder.0.layers.0.self_attn.in_proj_weight", "encoder.lateral_convs.0.conv.weight",
              "encoder.fpn_blocks.0.cv2.0.bottlenecks.0.conv1.conv.weight", "encoder.downsample_convs.1.0.cv2.conv.weight",
              "encoder.pan_blocks.1.cv4.norm.weight", "decoder.up", "decoder.decoder.reg_scale"):
        assert k in keys, k
    assert model.decoder.reg_scale.dtype == torch.int64
    assert all(not n.startswith("encoder.feature_projector") for n in keys)
    # GAM's AIFI group is exactly encoder.encoder.*
    aifi = sum(p.numel() for n, p in model.named_parameters() if n.startswith("encoder.encoder."))
    assert aifi == 789_760


@pytest.mark.parametrize("size", ["s", "m", "l", "x"])
def test_parameter_counts_match_official(size):
    model = build_detector(size)
    assert sum(p.numel() for p in model.parameters()) == OFFICIAL_TRAIN_PARAMS[size]
    model.deploy()
    deploy = sum(p.numel() for p in model.parameters()) / 1e6
    assert round(deploy, 2) == OFFICIAL_DEPLOY_MPARAMS[size]


@pytest.fixture(scope="module")
def model_s():
    return build_detector("s").eval()


@pytest.mark.parametrize("bad, match", [
    (torch.zeros(1, 3, 64, 64, dtype=torch.uint8), "255"),
    (torch.zeros(3, 64, 64), r"\[B,3,H,W\]"),
    (torch.zeros(1, 1, 64, 64), r"\[B,3,H,W\]"),
    (torch.zeros(1, 3, 64, 80), "multiples of 32"),
])
def test_rejects_bad_images(model_s, bad, match):
    with pytest.raises(ValueError, match=match):
        model_s(bad)


def test_config_overrides_and_errors():
    cfg = get_config("x", num_classes=3)
    assert (cfg.hidden_dim, cfg.aifi_ffn_dim, cfg.reg_scale, cfg.backbone, cfg.use_lab) == (384, 2048, 8, "B5", False)
    assert (SIZES["s"].csp_channels, SIZES["s"].csp_blocks, SIZES["m"].csp_blocks) == (64, 1, 2)
    with pytest.raises(ValueError, match="unknown detector size"):
        build_detector("xl")
    with pytest.raises(TypeError, match="unknown DetectorConfig field"):
        build_detector("s", hiden_dim=3)


def test_pretrained_backbone_from_local_path(tmp_path):
    torch.manual_seed(3)
    donor = build_detector("s").backbone
    state = {**donor.state_dict(), "head.fc.weight": torch.zeros(1)}  # a classifier head is ignored
    torch.save(state, tmp_path / "PPHGNetV2_B0_stage1.pth")
    model = build_detector("s", pretrained_backbone=str(tmp_path / "PPHGNetV2_B0_stage1.pth"))
    assert all(torch.equal(v, model.backbone.state_dict()[k]) for k, v in donor.state_dict().items())
    with pytest.raises(FileNotFoundError, match="PPHGNetV2"):
        build_detector("s", pretrained_backbone=str(tmp_path / "missing.pth"))


@pytest.mark.gpu
def test_cuda_train_step_and_eval_match_cpu():
    torch.manual_seed(0)
    model = build_detector("s", num_classes=5)
    images = torch.rand(2, 3, 320, 320)
    with torch.no_grad():
        cpu_out = model.eval()(images)
    model = model.cuda()
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    with torch.no_grad():
        gpu_out = model(images.cuda())
    from detector.deploy import detection_differences
    from detector.postprocessor import PostProcessor
    post, sizes = PostProcessor(num_classes=5).deploy(), torch.tensor([[320, 320], [320, 320]])
    diff = detection_differences([t.cpu() for t in post({k: v.cpu() for k, v in gpu_out.items()}, sizes)],
                                 post(cpu_out, sizes), tie_atol=1e-3)
    assert diff["labels"] == 0 and diff["scores"] < 1e-3 and diff["boxes"] < 0.5, diff  # boxes in pixels
    model.train()
    targets = [{k: v.cuda() for k, v in t.items()} for t in _targets(2)]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(images.cuda(), targets)
    (out["pred_logits"].float().sigmoid().mean() + out["aifi_feature"].float().pow(2).mean()).backward()
    assert torch.isfinite(model.get_parameter("backbone.stem.stem1.conv.weight").grad).all()
