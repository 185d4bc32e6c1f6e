"""A tiny random-init RT-DETRv2 student (transformers), shared by the detector and deploy tests."""
import pytest
import torch

from detector.rtdetrv2_student import build_rtdetrv2_student


def tiny_student(num_classes=5, **kw):
    from transformers import RTDetrResNetConfig
    bb = RTDetrResNetConfig(embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1], layer_type="basic",
                            out_features=["stage2", "stage3", "stage4"])
    torch.manual_seed(0)
    kw = dict(backbone_config=bb, encoder_in_channels=[32, 64, 128], encoder_hidden_dim=32, encoder_ffn_dim=64,
              d_model=32, decoder_ffn_dim=64, decoder_layers=2, num_queries=20, num_denoising=10,
              encoder_attention_heads=2, decoder_attention_heads=2, decoder_in_channels=[32, 32, 32]) | kw
    with pytest.warns(UserWarning, match="RANDOMLY INITIALISED"):
        return build_rtdetrv2_student(num_classes, **kw)


def tiny_student_dir(path, num_classes=80, **kw):
    """A tiny RT-DETRv2 saved as a transformers directory, like a COCO snapshot (``--student-weights``):
    ``num_classes`` classes named coco_0, coco_1, ..."""
    student = tiny_student(num_classes, class_names=[f"coco_{i}" for i in range(num_classes)], **kw)
    student.model.save_pretrained(path)
    return path
