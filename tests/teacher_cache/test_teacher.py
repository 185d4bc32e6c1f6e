"""Teachers: official protocol, local weights in Meta and timm formats, clear errors."""
import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from teacher_cache.teachers import WeightsError, build_teacher, choose_precision, resolve_arch

OFFICIAL_KEYS = Path(__file__).resolve().parents[1] / "fixtures" / "dinov3_vits16_meta_keys.json"


@pytest.fixture(scope="module")
def vits():
    with pytest.warns(UserWarning, match="RANDOMLY INITIALISED"):
        return build_teacher("dinov3_vits", depth=2)


def _perturbed(teacher):
    """Random init leaves LayerScale at 1e-5; perturb so parity checks see every weight."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in teacher.model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    return teacher


def to_meta_format(sd: dict) -> dict:
    """timm DINOv3 ViT state dict -> the key layout of Meta's DINOv3 release (.pth)."""
    out = {}
    for k, v in sd.items():
        if k.endswith("attn.q_bias") or k.endswith("attn.v_bias") or k == "rope.freqs":
            continue
        k = k.replace("reg_token", "storage_tokens").replace("gamma_1", "ls1.gamma")
        out[k.replace("gamma_2", "ls2.gamma")] = v.clone()
        if k.endswith("attn.qkv.weight"):
            dim = v.shape[1]
            q = sd.get(k.replace("qkv.weight", "q_bias"), torch.zeros(dim))
            vb = sd.get(k.replace("qkv.weight", "v_bias"), torch.zeros(dim))
            out[k.replace("weight", "bias")] = torch.cat([q, torch.zeros(dim), vb])
            out[k.replace("weight", "bias_mask")] = torch.cat(
                [torch.ones(dim), torch.zeros(dim), torch.ones(dim)])
    dim = sd["cls_token"].shape[-1]
    out["mask_token"] = torch.zeros(1, dim)
    heads = 6
    out["rope_embed.periods"] = 100 ** (2 * torch.arange(dim // heads // 4) / (dim // heads // 2))
    return out


def test_official_protocol_shapes(vits):
    x = torch.rand(2, 3, 128, 96)
    y = vits(x)
    assert y.shape == (2, 384, 4, 3) and vits.embed_dim == 384
    # 2x2 average pool of the normalised input, then final-norm patch tokens (no CLS/registers)
    xn = (x - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor(
        [0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    tokens = vits.model.forward_features(F.avg_pool2d(xn, 2))[:, vits.model.num_prefix_tokens:]
    ref = tokens.transpose(1, 2).reshape(2, 384, 4, 3)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    vits.train()
    assert not vits.training and not vits.model.training
    with pytest.raises(ValueError, match="multiples of 32"):
        vits(torch.rand(1, 3, 100, 100))


def test_other_families_give_stride32_grids():
    with pytest.warns(UserWarning):
        convnext = build_teacher("dinov3_convnext_tiny", depths=(1, 1, 1, 1))
        dinov2 = build_teacher("dinov2_vits_reg", depth=2)
    x = torch.rand(1, 3, 128, 64)
    assert convnext(x).shape == (1, 768, 4, 2)
    assert dinov2(x).shape == (1, 384, 4, 2)
    assert dinov2.protocol()["resample"].startswith("bicubic")


def test_unknown_vfm_is_refused():
    with pytest.raises(ValueError, match="unknown --vfm 'dinov9_vitz'"):
        resolve_arch("dinov9_vitz")
    assert resolve_arch("dinov3_vitb") == "vit_base_patch16_dinov3"
    assert resolve_arch("resnet18") == "resnet18"


def test_meta_and_timm_formats_give_identical_features(vits, tmp_path):
    teacher = _perturbed(vits)
    sd = {k: v.clone() for k, v in teacher.model.state_dict().items()}
    meta = to_meta_format(sd)
    official = {k: v for k, v in json.loads(OFFICIAL_KEYS.read_text()).items()
                if not re.match(r"blocks\.([2-9]|1\d)\.", k)}  # Meta's dinov3_vits16, 2 blocks
    assert sorted(meta) == sorted(official)
    assert all(list(meta[k].shape) == official[k] for k in official)
    torch.save(meta, tmp_path / "dinov3_vits16_pretrain.pth")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "model.safetensors"))
    a = build_teacher("dinov3_vits16", weights=tmp_path / "dinov3_vits16_pretrain.pth",
                      depth=2)
    b = build_teacher("dinov3_vits", weights=tmp_path / "model.safetensors", depth=2)
    x = torch.rand(2, 3, 64, 64)
    assert torch.equal(a(x), b(x)) and torch.equal(a(x), teacher(x))
    assert a.weights_sha256() == b.weights_sha256() == teacher.weights_sha256()
    assert a.fingerprint()["weights_source"] == "dinov3_vits16_pretrain.pth"


def test_meta_format_with_nonzero_qkv_bias_is_exact(vits, tmp_path):
    """Meta ViTs carry q/v biases; dropping them (timm's bias-free variant) would be wrong."""
    meta = to_meta_format(vits.model.state_dict())
    for k in meta:
        if k.endswith("attn.qkv.bias"):
            meta[k] = torch.randn_like(meta[k]) * 0.1 * meta[k.replace("bias", "bias_mask")]
    torch.save(meta, tmp_path / "w.pth")
    t = build_teacher("dinov3_vits", weights=tmp_path / "w.pth", depth=2)
    assert t.arch == "vit_small_patch16_dinov3_qkvb"
    q = t.model.blocks[0].attn.q_bias
    torch.testing.assert_close(q, meta["blocks.0.attn.qkv.bias"][:384])


def test_weights_that_do_not_fit_are_refused(vits, tmp_path):
    sd = dict(vits.model.state_dict())
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "small.safetensors"))
    with pytest.raises(WeightsError, match="do not fit 'dinov3_vitb'.*small.safetensors|small.safetensors.*do not fit"):
        build_teacher("dinov3_vitb", weights=tmp_path / "small.safetensors", depth=2)
    sd.pop("norm.weight")
    sd["extra.weight"] = torch.zeros(1)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(WeightsError, match=r"missing \['norm.weight'\].*unexpected \['extra.weight'\]"):
        build_teacher("dinov3_vits", weights=tmp_path / "bad.safetensors", depth=2)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="cannot read weights file .*junk.pth"):
        build_teacher("dinov3_vits", weights=tmp_path / "junk.pth")
    with pytest.raises(WeightsError, match="does not exist"):
        build_teacher("dinov3_vits", weights=tmp_path / "absent.pth")


def test_precision_choice_is_measured(vits, monkeypatch):
    from teacher_cache import bf16

    x = torch.rand(2, 3, 64, 64)
    assert choose_precision(vits, x, "fp32") == ("fp32", None)
    monkeypatch.setattr(bf16, "native_bf16_flags", lambda: [])   # a CPU without native bf16 (test_bf16_choice)
    assert choose_precision(vits, x, "auto") == ("fp32", None)  # CPU without native bf16: official fp32
    precision, fid = choose_precision(vits, x, "bf16", threshold=0.0)
    assert precision == "bf16" and 0.9 < fid <= 1.0001
    assert choose_precision(vits, x, "bf16", threshold=1.01)[0] == "fp32"
