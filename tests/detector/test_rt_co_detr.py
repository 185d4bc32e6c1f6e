import math

import pytest
import torch

from detector.rt_co_detr import RTCODETRConfig, RTCODETRDistiller, align_teacher_logits, hungarian_pairs


def _out(logits, boxes):
    return {"pred_logits": torch.as_tensor(logits, dtype=torch.float32),
            "pred_boxes": torch.as_tensor(boxes, dtype=torch.float32)}


def test_reference_defaults():
    c = RTCODETRConfig()
    assert (c.feature_weight, c.logit_weight, c.box_weight, c.temperature) == (1.0, 0.8, 1.2, 4.0)


def test_logit_and_box_losses_hand_values():
    kd = RTCODETRDistiller(RTCODETRConfig(student_channels=(), teacher_channels=(), temperature=1.0))
    s = _out([[[0.0, 0.0]]], [[[0.5, 0.5, 0.2, 0.2]]])
    t = _out([[[math.log(3.0), 0.0]]], [[[0.5, 0.5, 0.4, 0.2]]])
    out = kd(s, t)
    kl = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)     # KL([.75,.25] || [.5,.5]) = 0.130812
    assert out["loss_kd_logit"].item() == pytest.approx(0.8 * kl, abs=1e-6)
    assert out["loss_kd_box"].item() == pytest.approx(1.2 * 0.2 / 4, abs=1e-6)
    assert "loss_kd_feat" not in out


def test_temperature_scaling_t_squared():
    cfg = RTCODETRConfig(student_channels=(), teacher_channels=(), pairing="index")
    kd = RTCODETRDistiller(cfg)
    s = _out([[[0.0, 0.0]]], [[[0.5, 0.5, 0.2, 0.2]]])
    t = _out([[[4 * math.log(3.0), 0.0]]], [[[0.5, 0.5, 0.2, 0.2]]])   # /T=4 -> log 3
    kl = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert kd(s, t)["loss_kd_logit"].item() == pytest.approx(0.8 * 16 * kl, abs=1e-5)


def test_feature_mse_through_projection_with_teacher_resize():
    kd = RTCODETRDistiller(RTCODETRConfig(student_channels=(1,), teacher_channels=(1,)))
    with torch.no_grad():
        kd.feature_proj[0].weight.fill_(1.0)
        kd.feature_proj[0].bias.zero_()
    s, t = torch.ones(1, 1, 2, 2), torch.full((1, 1, 1, 1), 3.0)
    assert kd.feature_loss([s], [t]).item() == pytest.approx(4.0)
    kd2 = RTCODETRDistiller(RTCODETRConfig(student_channels=(8, 8), teacher_channels=(16, 32)))
    s2 = [torch.randn(2, 8, 4, 4, requires_grad=True), torch.randn(2, 8, 2, 2, requires_grad=True)]
    loss = kd2.feature_loss(s2, [torch.randn(2, 16, 8, 8), torch.randn(2, 32, 1, 1)])
    loss.backward()
    assert s2[0].grad.abs().sum() > 0 and kd2.feature_proj[1].weight.grad.abs().sum() > 0


def test_hungarian_pairing_beats_index_on_permuted_queries():
    torch.manual_seed(0)
    B, Q, C = 2, 6, 4
    logits = torch.randn(B, Q, C) * 3
    boxes = torch.rand(B, Q, 2) * 0.5 + 0.25
    boxes = torch.cat([boxes, torch.rand(B, Q, 2) * 0.2 + 0.05], -1)
    perm = torch.randperm(Q)
    s, t = _out(logits, boxes), _out(logits[:, perm], boxes[:, perm])
    cfg = dict(student_channels=(), teacher_channels=())
    hung = RTCODETRDistiller(RTCODETRConfig(**cfg))(s, t)
    index = RTCODETRDistiller(RTCODETRConfig(pairing="index", **cfg))(s, t)
    assert hung["loss_kd_logit"].item() == pytest.approx(0.0, abs=1e-6)
    assert hung["loss_kd_box"].item() == pytest.approx(0.0, abs=1e-7)
    assert index["loss_kd_logit"].item() > 0.01 and index["loss_kd_box"].item() > 0.01
    si, ti = hungarian_pairs(logits[0].sigmoid(), boxes[0], logits[0, perm].sigmoid(), boxes[0, perm])
    assert torch.equal(perm[ti], si)


def test_more_teacher_queries_than_student():
    s = _out(torch.zeros(1, 2, 3), [[[0.2, 0.2, 0.1, 0.1], [0.7, 0.7, 0.2, 0.2]]])
    t = _out(torch.zeros(1, 4, 3), [[[0.9, 0.9, 0.1, 0.1], [0.7, 0.7, 0.2, 0.2],
                                     [0.1, 0.9, 0.1, 0.1], [0.2, 0.2, 0.1, 0.1]]])
    out = RTCODETRDistiller(RTCODETRConfig(student_channels=(), teacher_channels=()))(s, t)
    assert out["loss_kd_box"].item() == pytest.approx(0.0, abs=1e-7)


def test_class_map_drop_and_merge():
    t = torch.tensor([[1.0, 2.0, 3.0]])
    al, cls = align_teacher_logits(t, 2, {0: 1, 2: 0})       # teacher class 1 dropped
    assert cls.tolist() == [0, 1] and al.tolist() == [[3.0, 1.0]]
    al, cls = align_teacher_logits(t, 2, {0: 0, 1: 0})        # merged, student class 1 unmapped
    assert cls.tolist() == [0]
    assert al[0, 0].item() == pytest.approx(math.log(math.e + math.e ** 2))
    with pytest.raises(ValueError, match="class_map"):
        align_teacher_logits(t, 2, None)
    with pytest.raises(ValueError, match="out of range"):
        align_teacher_logits(t, 2, {5: 0})


def test_class_map_in_loss_renormalises_over_mapped_classes():
    # teacher [log3, 0, 100]: class 2 is unmapped, so its huge logit must not matter
    cfg = RTCODETRConfig(student_channels=(), teacher_channels=(), temperature=1.0, class_map={0: 0, 1: 1})
    s = _out([[[0.0, 0.0]]], [[[0.5, 0.5, 0.2, 0.2]]])
    t = _out([[[math.log(3.0), 0.0, 100.0]]], [[[0.5, 0.5, 0.2, 0.2]]])
    kl = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert RTCODETRDistiller(cfg)(s, t)["loss_kd_logit"].item() == pytest.approx(0.8 * kl, abs=1e-6)


def test_gradients_reach_student_predictions_only():
    torch.manual_seed(0)
    sl = torch.randn(2, 5, 3, requires_grad=True)
    sb = (torch.rand(2, 5, 4) * 0.3 + 0.2).requires_grad_()
    tl = torch.randn(2, 5, 3, requires_grad=True)
    out = RTCODETRDistiller(RTCODETRConfig(student_channels=(), teacher_channels=()))(
        {"pred_logits": sl, "pred_boxes": sb}, {"pred_logits": tl, "pred_boxes": torch.rand(2, 5, 4)})
    sum(out.values()).backward()
    assert sl.grad.abs().sum() > 0 and sb.grad.abs().sum() > 0 and tl.grad is None


def test_end_to_end_with_rtdetrv4_student_and_teacher():
    detector = pytest.importorskip("detector")
    from detector.rt_co_detr import EncoderTap
    torch.manual_seed(0)
    student = detector.build_detector("s", num_classes=3, num_denoising=0, num_queries=20).train()
    teacher = detector.build_detector("s", num_classes=4, num_denoising=0, num_queries=30).eval()
    s_tap, t_tap = EncoderTap(student), EncoderTap(teacher)
    images = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        t_out = teacher(images)
    s_out = student(images)
    assert [m.shape[-1] for m in s_tap.maps] == [8, 4, 2] and len(t_tap.maps) == 3
    kd = RTCODETRDistiller(RTCODETRConfig(student_channels=(256,) * 3, teacher_channels=(256,) * 3,
                                          class_map={0: 0, 1: 1, 3: 2}))
    losses = kd(s_out, t_out, s_tap.maps, t_tap.maps)
    assert set(losses) == {"loss_kd_feat", "loss_kd_logit", "loss_kd_box"}
    sum(losses.values()).backward()
    assert student.backbone.stem.stem1.conv.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())
    s_tap.remove()
    t_tap.remove()


def test_index_pairing_reproduces_reference_formula():
    # reference: KLDivLoss(batchmean)(log_softmax(s/T), softmax(t/T)) * T^2 and L1Loss(mean) over all queries
    torch.manual_seed(0)
    s, t = _out(torch.randn(2, 7, 5), torch.rand(2, 7, 4)), _out(torch.randn(2, 7, 5), torch.rand(2, 7, 4))
    T = 4.0
    kl = torch.nn.KLDivLoss(reduction="batchmean")(torch.log_softmax(s["pred_logits"] / T, -1),
                                                  torch.softmax(t["pred_logits"] / T, -1)) * T * T
    box = torch.nn.L1Loss()(s["pred_boxes"], t["pred_boxes"])
    out = RTCODETRDistiller(RTCODETRConfig(student_channels=(), teacher_channels=(), pairing="index"))(s, t)
    assert out["loss_kd_logit"].item() == pytest.approx(0.8 * kl.item(), rel=1e-5)
    assert out["loss_kd_box"].item() == pytest.approx(1.2 * box.item(), rel=1e-5)
