"""The RT-DETR-L (RT-DETRv2-R50vd) student from transformers behind our detector interface."""
import pytest
import torch

pytest.importorskip("transformers")

from detector.postprocessor import PostProcessor  # noqa: E402
from detector.rt_co_detr import EncoderTap, RTCODETRConfig, RTCODETRDistiller  # noqa: E402
from detector.rtdetrv2_student import RTDETRv2Criterion, build_rtdetrv2_student, rtdetrv2_config  # noqa: E402
from tiny_rtdetrv2 import tiny_student  # noqa: E402


TARGETS = [{"labels": torch.tensor([1, 2]), "boxes": torch.tensor([[.5, .5, .2, .2], [.3, .3, .1, .2]])},
           {"labels": torch.tensor([0]), "boxes": torch.tensor([[.4, .5, .3, .2]])}]


def test_training_outputs_split_denoising_and_use_its_own_criterion():
    student = tiny_student().train()
    tap = EncoderTap(student)
    out = student(torch.rand(2, 3, 64, 64), TARGETS)
    assert out["pred_logits"].shape == (2, 20, 5) and out["pred_boxes"].shape == (2, 20, 4)
    n_dn = out["dn_meta"]["dn_num_split"][0]
    assert n_dn > 0 and out["dn_pred_logits"].shape == (2, n_dn, 5)
    losses = RTDETRv2Criterion(5)(out, TARGETS)
    assert {"loss_vfl", "loss_bbox", "loss_giou", "loss_vfl_dn_0"} <= set(losses)
    total = sum(losses.values())
    total.backward()
    assert torch.isfinite(total) and student.model.model.denoising_class_embed.weight.grad is not None
    assert [tuple(m.shape) for m in tap.maps] == [(2, 32, 8, 8), (2, 32, 4, 4), (2, 32, 2, 2)]
    assert student.feature_channels == (32, 32, 32)


def test_kl_and_l1_ignore_the_denoising_queries():
    student = tiny_student().train()
    out = student(torch.rand(2, 3, 64, 64), TARGETS)
    teacher = {"pred_logits": out["pred_logits"].detach().clone(), "pred_boxes": out["pred_boxes"].detach().clone()}
    kd = RTCODETRDistiller(RTCODETRConfig(student_channels=(), teacher_channels=()))
    losses = kd(out, teacher)   # the teacher equals the matching queries: nothing to learn
    assert losses["loss_kd_logit"].item() == pytest.approx(0.0, abs=1e-5)
    assert losses["loss_kd_box"].item() == pytest.approx(0.0, abs=1e-6)
    out["dn_pred_logits"] = out["dn_pred_logits"] + 100.0   # denoising queries do not enter
    assert kd(out, teacher)["loss_kd_logit"].item() == pytest.approx(0.0, abs=1e-5)


def test_our_decoder_keeps_denoising_out_of_the_final_layer_outputs():
    from detector import build_detector
    model = build_detector("s", num_classes=3).train()
    out = model(torch.rand(1, 3, 128, 128), [{"labels": torch.tensor([1]), "boxes": torch.tensor([[.5, .5, .2, .2]])}])
    assert "dn_meta" in out and out["pred_logits"].shape[1] == model.cfg.num_queries


def test_eval_outputs_feed_our_postprocessor():
    student = tiny_student().eval()
    with torch.no_grad():
        out = student(torch.rand(1, 3, 64, 64))
    assert set(out) == {"pred_logits", "pred_boxes"} and out["pred_logits"].shape == (1, 20, 5)
    dets = PostProcessor(num_classes=5, num_top_queries=10)(out, torch.tensor([[64, 64]]))
    assert dets[0]["boxes"].shape == (10, 4)


def test_default_config_is_rtdetrv2_r50vd():
    from transformers import RTDetrV2ForObjectDetection
    cfg = rtdetrv2_config(80)
    assert list(cfg.backbone_config.depths) == [3, 4, 6, 3] and cfg.backbone_config.layer_type == "bottleneck"
    assert tuple(cfg.encoder_in_channels) == (512, 1024, 2048) and cfg.num_labels == 80
    params = sum(p.numel() for p in RTDetrV2ForObjectDetection(cfg).parameters()) / 1e6
    assert 42.5 < params < 43.3        # transformers' count; the paper states 40.92 M (see docs/rt_co_detr.md)


def test_local_weights_round_trip(tmp_path):
    student = tiny_student(num_classes=5)
    student.model.save_pretrained(tmp_path)
    again = build_rtdetrv2_student(5, weights=tmp_path)
    for (k, a), b in zip(student.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k


def test_denoising_embedding_is_found_for_the_ddp_zero_gradient_guard():
    """The trainer keeps the denoising embedding in the graph on a rank without boxes (DDP would wait
    for its gradient forever); transformers keeps it on the model, not on the decoder."""
    student = tiny_student().train()
    assert student.denoising_class_embed is student.model.model.denoising_class_embed
    empty = [{"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}] * 2
    out = student(torch.rand(2, 3, 64, 64), empty)
    loss = sum(RTDETRv2Criterion(5)(out, empty).values()) + 0.0 * student.denoising_class_embed.weight.sum()
    loss.backward()
    assert student.denoising_class_embed.weight.grad is not None
