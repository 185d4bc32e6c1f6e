"""A tiny random-init RT-DETRv2 student (transformers), shared by the detector and deploy tests."""
import pytest
import torch

from detector.rtdetrv2_student import build_rtdetrv2_student


def tiny_student(num_classes=5, **kw):
    from transformers import RTDetrResNetConfig
    bb = RTDetrResNetConfig(embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1], layer_type="basic",
                            out_features=["stage2", "stage3", "stage4"])
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="RANDOMLY INITIALISED"):
        return build_rtdetrv2_student(num_classes, backbone_config=bb, encoder_in_channels=[32, 64, 128],
                                      encoder_hidden_dim=32, encoder_ffn_dim=64, d_model=32, decoder_ffn_dim=64,
                                      decoder_layers=2, num_queries=20, num_denoising=10, encoder_attention_heads=2,
                                      decoder_attention_heads=2, decoder_in_channels=[32, 32, 32], **kw)
