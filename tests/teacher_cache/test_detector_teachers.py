"""transformers DETR-family teachers behind one adapter: outputs renamed, C3-C5 from the one
backbone pass, the processor's protocol, offline loading, and the class map by name / slice / JSON."""
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from detector.rt_co_detr import resolve_class_map  # noqa: E402
from teacher_cache.detector_teachers import build_detector_teacher  # noqa: E402

COCO_LIKE = {0: "N/A", 1: "person", 44: "bottle", 47: "cup"}   # the 91 DETR category-id slots


def _id2label(n=91):
    return {i: COCO_LIKE.get(i, "N/A" if i % 10 == 0 else f"thing{i}") for i in range(n)}


def _tiny_conditional_detr():
    from transformers import ConditionalDetrConfig, ConditionalDetrForObjectDetection
    cfg = ConditionalDetrConfig(backbone="resnet18", use_timm_backbone=True, use_pretrained_backbone=False, d_model=32,
                                encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                                decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, num_queries=10,
                                num_labels=91, id2label=_id2label())
    torch.manual_seed(0)
    return ConditionalDetrForObjectDetection(cfg)


@pytest.fixture(scope="module")
def cdetr_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("cdetr")
    _tiny_conditional_detr().save_pretrained(path)
    (path / "preprocessor_config.json").write_text(json.dumps(
        {"size": {"shortest_edge": 96, "longest_edge": 160}, "do_normalize": True,
         "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}))
    return path


def test_conditional_detr_outputs_and_c3_c5_from_the_one_backbone_pass(cdetr_dir):
    teacher = build_detector_teacher(cdetr_dir)
    assert teacher.channels == (128, 256, 512) and teacher.source == "model.safetensors"
    calls = []
    teacher.backbone.register_forward_hook(lambda *a: calls.append(1))
    images = torch.rand(2, 3, 64, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, maps = teacher(images)
    assert len(calls) == 1                                  # no second backbone pass
    assert set(out) == {"pred_logits", "pred_boxes"}
    assert out["pred_logits"].shape == (2, 10, 91) and out["pred_boxes"].shape == (2, 10, 4)
    # processor: shortest edge 96 -> the 64x64 batch is seen at 96x96; strides 8/16/32
    assert [tuple(m.shape) for m in maps] == [(2, 128, 12, 12), (2, 256, 6, 6), (2, 512, 3, 3)]
    assert all(t.dtype == torch.float32 and not t.requires_grad for t in [*maps, *out.values()])
    # same numbers as the transformers model fed the ImageNet-normalised, resized batch
    x = torch.nn.functional.interpolate(images, size=(96, 96), mode="bilinear", align_corners=False, antialias=True)
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        ref = teacher.model(pixel_values=(x - mean) / std)
    torch.testing.assert_close(out["pred_logits"], ref.logits)
    # the authors' 640 (here 64) by flag
    _, maps64 = build_detector_teacher(cdetr_dir, input_size=64)(images)
    assert maps64[0].shape[-2:] == (8, 8)


def test_directory_without_weights_is_random_init_with_a_warning(tmp_path):
    _tiny_conditional_detr().config.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="RANDOMLY INITIALISED"):
        teacher = build_detector_teacher(tmp_path)
    assert teacher.source == "random-init" and teacher.class_names[44] == "bottle"


def test_rt_detr_and_detr_through_the_same_adapter(tmp_path):
    from transformers import (DetrConfig, DetrForObjectDetection, RTDetrConfig, RTDetrForObjectDetection,
                              RTDetrResNetConfig)
    bb = RTDetrResNetConfig(embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1], layer_type="basic",
                            out_features=["stage2", "stage3", "stage4"])
    rt = RTDetrForObjectDetection(RTDetrConfig(
        backbone_config=bb, encoder_in_channels=[32, 64, 128], encoder_hidden_dim=32, encoder_ffn_dim=64, d_model=32,
        decoder_ffn_dim=64, decoder_layers=2, num_queries=12, encoder_attention_heads=2, decoder_attention_heads=2,
        num_labels=5, decoder_in_channels=[32, 32, 32]))
    rt.save_pretrained(tmp_path / "rtdetr")
    (tmp_path / "rtdetr" / "preprocessor_config.json").write_text(json.dumps(
        {"size": {"height": 64, "width": 64}, "do_normalize": False}))
    teacher = build_detector_teacher(tmp_path / "rtdetr")
    assert not teacher.normalise and teacher.channels == (32, 64, 128)
    out, maps = teacher(torch.rand(1, 3, 96, 96))
    assert out["pred_logits"].shape == (1, 12, 5) and maps[2].shape == (1, 128, 2, 2)

    detr = DetrForObjectDetection(DetrConfig(
        backbone="resnet18", use_timm_backbone=True, use_pretrained_backbone=False, d_model=32, encoder_layers=1,
        decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
        decoder_ffn_dim=32, num_queries=7, num_labels=91, id2label=_id2label()))
    detr.save_pretrained(tmp_path / "detr")
    teacher = build_detector_teacher(tmp_path / "detr")
    out, maps = teacher(torch.rand(1, 3, 64, 64))
    assert out["pred_logits"].shape == (1, 7, 92)          # + DETR's no-object column, never mapped
    assert len(teacher.class_names) == 91 and [m.shape[1] for m in maps] == [128, 256, 512]


def test_class_map_by_name_slice_and_json():
    teacher = [_id2label()[i] for i in range(91)]
    student = ["Bottle", "Can", "cup", "Cigarette"]
    by_name = resolve_class_map(None, teacher, student, 91)
    assert by_name == {44: 0, 47: 2}                        # "Can", "Cigarette": no partner, no KL
    assert resolve_class_map("name", teacher, student, 91) == by_name
    assert resolve_class_map("slice", teacher, student, 91) == {0: 0, 1: 1, 2: 2, 3: 3}   # N/A, person, ...
    assert resolve_class_map({"bottle": "Can", "47": 3}, teacher, student, 91) == {44: 1, 47: 3}
    assert resolve_class_map(None, None, student, 4) is None   # a teacher without names: identity
    with pytest.raises(ValueError, match="--class-map slice"):
        resolve_class_map(None, teacher, ["Shoe"], 91)
    with pytest.raises(ValueError, match="'Plate' is not a student class"):
        resolve_class_map({"bottle": "Plate"}, teacher, student, 91)


def test_kl_uses_only_the_mapped_columns():
    from detector.rt_co_detr import RTCODETRConfig, RTCODETRDistiller
    teacher_names = [_id2label()[i] for i in range(91)]
    cmap = resolve_class_map(None, teacher_names, ["Bottle", "Can", "cup"], 91)
    kd = RTCODETRDistiller(RTCODETRConfig(student_channels=(), teacher_channels=(), class_map=cmap, pairing="index"))
    t_logits = torch.randn(1, 3, 91)
    s_logits = torch.randn(1, 3, 3)
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.3, 0.3, 0.1, 0.1], [0.7, 0.7, 0.2, 0.3]]])
    base = kd({"pred_logits": s_logits, "pred_boxes": boxes}, {"pred_logits": t_logits, "pred_boxes": boxes})
    t2, s2 = t_logits.clone(), s_logits.clone()
    t2[..., 1] += 5.0      # "person": unmapped teacher column
    s2[..., 1] += 5.0      # "Can": student column without a partner
    moved = kd({"pred_logits": s2, "pred_boxes": boxes}, {"pred_logits": t2, "pred_boxes": boxes})
    assert moved["loss_kd_logit"].item() == pytest.approx(base["loss_kd_logit"].item(), abs=1e-6)
