import math

import pytest
import torch
import torch.nn.functional as F

from detector.dsi import DSI, OFFICIAL_PROJECTOR_KEYS, DSIConfig


def _identity_dsi(**kw):
    dsi = DSI(DSIConfig(student_dim=2, teacher_dim=2, **kw))
    with torch.no_grad():
        dsi.feature_projector[0].weight.copy_(torch.eye(2).reshape(dsi.feature_projector[0].weight.shape))
        dsi.feature_projector[0].bias.zero_()
    return dsi


# student tokens [1,0], [0,1]; teacher tokens [1,0], [1,1]  (B=1, C=2, H=1, W=2)
STUDENT = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]]])
TEACHER = torch.tensor([[[[1.0, 1.0]], [[0.0, 1.0]]]])


@pytest.mark.parametrize("projector", ["linear", "conv1x1"])
def test_cosine_loss_hand_value(projector):
    loss = _identity_dsi(projector=projector)(STUDENT, TEACHER)
    assert loss.item() == pytest.approx((0.0 + (1 - 1 / math.sqrt(2))) / 2, abs=1e-6)


def test_mse_variant_hand_value():
    assert _identity_dsi(loss="mse")(STUDENT, TEACHER).item() == pytest.approx(0.25)


def test_shapes_and_variants_project_to_teacher_grid():
    x = torch.randn(2, 256, 5, 7)
    for proj in ("linear", "mlp", "conv1x1"):
        assert DSI(DSIConfig(projector=proj)).project(x).shape == (2, 768, 5, 7)
    assert DSI(DSIConfig(student_dim=384)).project(torch.randn(1, 384, 2, 2)).shape == (1, 768, 2, 2)


def test_conv1x1_equals_linear_with_same_weights():
    lin, conv = DSI(DSIConfig(projector="linear")), DSI(DSIConfig(projector="conv1x1"))
    conv.load_official_projector(lin.official_projector_state_dict())
    x = torch.randn(2, 256, 3, 4)
    torch.testing.assert_close(lin.project(x), conv.project(x), rtol=1e-5, atol=1e-5)


def test_gradient_flows_to_projector_and_student_not_teacher():
    dsi = DSI()
    s = torch.randn(2, 256, 4, 4, requires_grad=True)
    t = torch.randn(2, 768, 4, 4, requires_grad=True)
    dsi(s, t).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert dsi.feature_projector[0].weight.grad.abs().sum() > 0
    assert t.grad is None


def test_teacher_resized_bilinear_to_student_grid():
    dsi = DSI()
    s, t = torch.randn(1, 256, 3, 3), torch.randn(1, 768, 5, 5)
    with pytest.warns(UserWarning, match="resizing"):
        loss = dsi(s, t)
    t_r = F.interpolate(t, size=(3, 3), mode="bilinear", align_corners=False)
    assert loss.item() == pytest.approx(dsi(s, t_r).item(), abs=1e-6)


def test_channel_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="teacher_dim"):
        DSI()(torch.randn(1, 256, 2, 2), torch.randn(1, 1024, 2, 2))
    with pytest.raises(ValueError, match="student_dim"):
        DSI()(torch.randn(1, 384, 2, 2), torch.randn(1, 768, 2, 2))


def test_fp16_student_gives_fp32_loss():
    dsi = DSI()
    loss = dsi.alignment_loss(torch.randn(1, 768, 2, 2).half(), torch.randn(1, 768, 2, 2))
    assert loss.dtype == torch.float32


def test_official_projector_load_and_export():
    w, b = torch.randn(768, 256), torch.randn(768)
    sd = {"module." + OFFICIAL_PROJECTOR_KEYS[0]: w, "module." + OFFICIAL_PROJECTOR_KEYS[1]: b,
          "module.backbone.x": torch.zeros(1)}
    dsi = DSI()
    dsi.load_official_projector(sd)
    assert torch.equal(dsi.feature_projector[0].weight, w) and torch.equal(dsi.feature_projector[0].bias, b)
    out = dsi.official_projector_state_dict()
    assert set(out) == set(OFFICIAL_PROJECTOR_KEYS) and torch.equal(out[OFFICIAL_PROJECTOR_KEYS[0]], w)
    with pytest.raises(KeyError):
        dsi.load_official_projector({"backbone.x": torch.zeros(1)})
    with pytest.raises(ValueError, match="does not fit"):
        DSI(DSIConfig(student_dim=384)).load_official_projector(out)


def test_tap_selection():
    f5 = torch.randn(1, 256, 2, 2)
    assert DSI().student_map({"aifi_feature": f5}) is f5
    with pytest.raises(KeyError):
        DSI().student_map({})
    hybrid = DSI(DSIConfig(tap="hybrid"))
    with pytest.raises(ValueError, match="tap_feature"):
        hybrid.student_map({"aifi_feature": f5})
    other = torch.randn(1, 256, 4, 4)
    assert hybrid.student_map({"aifi_feature": f5}, tap_feature=other) is other


def test_training_reduces_loss():
    torch.manual_seed(0)
    dsi = DSI(DSIConfig(student_dim=8, teacher_dim=16))
    s, t = torch.randn(4, 8, 3, 3), torch.randn(4, 16, 3, 3)
    opt = torch.optim.Adam(dsi.parameters(), lr=1e-2)
    first = dsi(s, t).item()
    for _ in range(50):
        opt.zero_grad()
        loss = dsi(s, t)
        loss.backward()
        opt.step()
    assert loss.item() < 0.8 * first


def test_with_rtdetrv4_gradient_reaches_aifi_input_proj2_backbone_only():
    detector = pytest.importorskip("detector")
    from detector.gam import GAM, GAMConfig
    model = detector.build_detector("s", num_classes=3, num_denoising=0, num_queries=20).train()
    out = model(torch.rand(1, 3, 64, 64))
    dsi = DSI(DSIConfig(student_dim=model.cfg.hidden_dim))
    loss = dsi(dsi.student_map(out), torch.randn(1, 768, 2, 2))
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if n.startswith("encoder.encoder."))
    assert any(g is not None for n, g in grads.items() if n.startswith("encoder.input_proj.2"))
    assert all(g is None for n, g in grads.items() if n.startswith(("decoder.", "encoder.input_proj.0")))
    share = GAM(GAMConfig.for_size("s")).measure(model).item()
    assert 0 < share < 100
