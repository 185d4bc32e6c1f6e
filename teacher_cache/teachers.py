"""Frozen vision-foundation-model teachers with the official RT-DETRv4 input protocol.

The official teacher (engine/rtv4/dinov3_teacher.py) takes the detector's [0,1] RGB batch,
re-normalises it with ImageNet mean/std, average-pools 2x2 (640 -> 320) and returns DINOv3's
``x_norm_patchtokens`` (final LayerNorm, CLS and the 4 register tokens dropped) as
[B, C, H/32, W/32]: the stride-32 grid of F5. The same rule generalises to any backbone by
resampling its input so that its own stride lands on 32: 2x2 average pool for patch-16 ViTs,
bicubic resize to H/32*14 for patch-14 DINOv2 (the official DINOv2TeacherModel), identity for
stride-32 ConvNeXts. The network itself is timm's; weights come only from local files.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import re
import sys
import warnings
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
GRID_STRIDE = 32
PRECISIONS = ("fp32", "bf16")

# Project names (and the official torch.hub names) -> timm architectures.
VFM_ALIASES = {
    "dinov3_vits": "vit_small_patch16_dinov3",
    "dinov3_vits16": "vit_small_patch16_dinov3",
    "dinov3_vits_plus": "vit_small_plus_patch16_dinov3",
    "dinov3_vits16plus": "vit_small_plus_patch16_dinov3",
    "dinov3_vitb": "vit_base_patch16_dinov3",
    "dinov3_vitb16": "vit_base_patch16_dinov3",
    "dinov3_vitl": "vit_large_patch16_dinov3",
    "dinov3_vitl16": "vit_large_patch16_dinov3",
    "dinov3_vith_plus": "vit_huge_plus_patch16_dinov3",
    "dinov3_vith16plus": "vit_huge_plus_patch16_dinov3",
    "dinov3_vit7b": "vit_7b_patch16_dinov3",
    "dinov3_vit7b16": "vit_7b_patch16_dinov3",
    "dinov3_convnext_tiny": "convnext_tiny",
    "dinov3_convnext_small": "convnext_small",
    "dinov3_convnext_base": "convnext_base",
    "dinov3_convnext_large": "convnext_large",
    "dinov2_vits_reg": "vit_small_patch14_reg4_dinov2",
    "dinov2_vitb_reg": "vit_base_patch14_reg4_dinov2",
    "dinov2_vitl_reg": "vit_large_patch14_reg4_dinov2",
    "dinov2_vitg_reg": "vit_giant_patch14_reg4_dinov2",
    "dinov2_vits14_reg": "vit_small_patch14_reg4_dinov2",
    "dinov2_vitb14_reg": "vit_base_patch14_reg4_dinov2",
    "dinov2_vitl14_reg": "vit_large_patch14_reg4_dinov2",
    "dinov2_vitg14_reg": "vit_giant_patch14_reg4_dinov2",
}


class WeightsError(ValueError):
    """Raised when a weights file cannot be read or does not fit the architecture."""


def resolve_arch(vfm: str) -> str:
    """Map a --vfm name to a timm architecture; any timm model name is accepted as is."""
    name = vfm[len("timm:"):] if vfm.startswith("timm:") else vfm
    arch = VFM_ALIASES.get(name, name)
    if not timm.is_model(arch):
        known = ", ".join(sorted(k for k in VFM_ALIASES if not re.search(r"\d\d", k)))
        raise ValueError(f"unknown --vfm {vfm!r}: not a project teacher ({known}) nor a timm "
                         f"model name (see timm.list_models())")
    return arch


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a .pth/.pt (Meta's DINOv3 release) or .safetensors (timm/HF) state dict."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            sd = load_file(str(path))
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - re-raised with the file name and the fix
        raise WeightsError(f"cannot read weights file {path}: {e}. Pass a .pth state dict from "
                           "Meta's DINOv3 release or a timm/HF .safetensors file") from e
    for wrapper in ("model_ema", "model", "teacher", "state_dict", "module"):
        if isinstance(sd, dict) and isinstance(sd.get(wrapper), dict):
            sd = sd[wrapper]
    if not isinstance(sd, dict) or not all(torch.is_tensor(v) for v in sd.values()):
        raise WeightsError(f"weights file {path} does not hold a state dict of tensors")
    return sd


def _needs_qkv_bias(sd: dict[str, torch.Tensor]) -> bool:
    """Meta's DINOv3 ViTs store qkv.bias (k part masked); timm drops it unless the
    `_qkvb` variant is used, which is only exact when the q/v biases are zero."""
    if any(k.endswith("attn.q_bias") for k in sd):
        return True
    return any(k.endswith("attn.qkv.bias") and v.abs().max() > 0 for k, v in sd.items())


def _convert(sd: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Apply timm's own checkpoint filter of the model family (Meta key names -> timm)."""
    module = sys.modules[type(model).__module__]
    fn = getattr(module, "checkpoint_filter_fn", None)
    if fn is None:
        return sd
    with contextlib.redirect_stdout(io.StringIO()):  # timm prints while probing q_bias
        return fn(sd, model)


def state_dict_sha256(model: nn.Module) -> str:
    """Hash of the weights themselves (sorted names + bytes), so a Meta-format and a
    timm-format file holding the same weights give the same teacher fingerprint."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class Teacher(nn.Module):
    """A frozen VFM behind the official protocol: [B,3,H,W] in [0,1] -> [B,C,H/32,W/32]."""

    def __init__(self, vfm: str, arch: str, model: nn.Module, precision: str = "fp32",
                 weights_source: str = "random-init"):
        super().__init__()
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        self.vfm, self.arch, self.model = vfm, arch, model.eval().requires_grad_(False)
        self.precision, self.weights_source = precision, weights_source
        cfg = getattr(model, "pretrained_cfg", {}) or {}
        mean, std = cfg.get("mean", IMAGENET_MEAN), cfg.get("std", IMAGENET_STD)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.is_vit = hasattr(model, "patch_embed")
        self.patch = (model.patch_embed.patch_size[0] if self.is_vit
                      else model.feature_info[-1]["reduction"])
        self.embed_dim = model.embed_dim if self.is_vit else model.feature_info[-1]["num_chs"]
        self._weights_sha256: str | None = None

    def train(self, mode: bool = True) -> "Teacher":
        return super().train(False)  # frozen: never switch dropout/drop-path on

    def resample(self, x: torch.Tensor) -> torch.Tensor:
        """Bring the input to the scale where the backbone's stride maps onto stride 32."""
        if self.patch == GRID_STRIDE:
            return x
        if GRID_STRIDE % self.patch == 0:  # official: AvgPool2d(2, 2) for patch 16
            k = GRID_STRIDE // self.patch
            return F.avg_pool2d(x, k, k)
        h, w = x.shape[-2] // GRID_STRIDE * self.patch, x.shape[-1] // GRID_STRIDE * self.patch
        return F.interpolate(x, size=(h, w), mode="bicubic", antialias=True, align_corners=False)

    def _grid(self, x: torch.Tensor) -> torch.Tensor:
        if self.is_vit:  # final-LayerNorm patch tokens, prefix (CLS + registers) dropped
            return self.model.forward_intermediates(x, indices=[-1], norm=True, output_fmt="NCHW",
                                                    intermediates_only=True)[-1]
        x = self.model.forward_features(x)  # ConvNeXt: final LayerNorm over the last stage
        norm = getattr(getattr(self.model, "head", None), "norm", None)
        return norm(x) if norm is not None else x

    @torch.no_grad()
    def forward(self, images: torch.Tensor, precision: str | None = None) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"teacher input must be [B,3,H,W] in [0,1], got {tuple(images.shape)}")
        if images.shape[-2] % GRID_STRIDE or images.shape[-1] % GRID_STRIDE:
            raise ValueError(f"teacher input H,W must be multiples of {GRID_STRIDE}, "
                             f"got {tuple(images.shape[-2:])}")
        x = (images.float() - self.mean) / self.std
        x = self.resample(x)
        use_bf16 = (precision or self.precision) == "bf16"
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=use_bf16):
            out = self._grid(x)
        return out.float()

    def weights_sha256(self) -> str:
        if self._weights_sha256 is None:
            self._weights_sha256 = state_dict_sha256(self.model)
        return self._weights_sha256

    def protocol(self) -> dict:
        resample = ("none" if self.patch == GRID_STRIDE else
                    f"avgpool{GRID_STRIDE // self.patch}x{GRID_STRIDE // self.patch}"
                    if GRID_STRIDE % self.patch == 0 else f"bicubic-antialias-to-H/32*{self.patch}")
        return {"input": "RGB [0,1]", "normalise": {"mean": self.mean.flatten().tolist(),
                                                   "std": self.std.flatten().tolist()},
                "resample": resample, "tokens": "final-norm patch tokens, CLS/registers dropped",
                "grid_stride": GRID_STRIDE, "precision": self.precision}

    def fingerprint(self) -> dict:
        """Identity of the targets this teacher produces (compared when a store is opened)."""
        return {"name": self.vfm, "arch": self.arch, "embed_dim": self.embed_dim,
                "weights_sha256": self.weights_sha256(), "weights_source": self.weights_source,
                "protocol": self.protocol()}


def build_teacher(vfm: str, weights: str | Path | None = None, precision: str = "fp32",
                  **model_kwargs) -> Teacher:
    """Build a frozen teacher. Without ``weights`` it is randomly initialised (seed 0, so two
    builds agree) and warns loudly: its features are only fit for demos and tests."""
    arch = resolve_arch(vfm)
    sd = load_state_dict_file(weights) if weights is not None else None
    if sd is not None and _needs_qkv_bias(sd) and timm.is_model(arch + "_qkvb"):
        arch += "_qkvb"
    kwargs = dict(pretrained=False, num_classes=0, **model_kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        try:
            model = timm.create_model(arch, dynamic_img_size=True, **kwargs)
        except TypeError:  # CNNs take any input size without the flag
            model = timm.create_model(arch, **kwargs)
    if sd is None:
        warnings.warn(f"teacher {vfm!r} ({arch}) is RANDOMLY INITIALISED: no --weights given. "
                      "Its features are meaningless for training; use only for demos and tests.",
                      stacklevel=2)
        return Teacher(vfm, arch, model, precision)
    converted = _convert(sd, model)
    try:
        missing, unexpected = model.load_state_dict(converted, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise WeightsError(f"weights {weights} do not fit {vfm!r} ({arch}): {e}. "
                           "Pass the --vfm this file was released for") from e
    if missing or unexpected:
        raise WeightsError(f"weights {weights} do not fit {vfm!r} ({arch}): "
                           f"missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
                           f"unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}. "
                           "Pass the --vfm this file was released for")
    return Teacher(vfm, arch, model, precision, weights_source=Path(weights).name)


def bf16_fidelity(teacher: Teacher, images: torch.Tensor) -> float:
    """Mean per-token cosine between the bf16 and fp32 grids of the same images."""
    ref = teacher(images, precision="fp32")
    low = teacher(images, precision="bf16")
    return F.cosine_similarity(ref, low, dim=1).mean().item()


def choose_precision(teacher: Teacher, images: torch.Tensor, requested: str,
                     threshold: float = 0.999) -> tuple[str, float | None]:
    """fp32 like the official code, or bf16 when its measured fidelity clears ``threshold``.
    ``requested`` is 'fp32', 'bf16' or 'auto' (bf16 on CUDA; on a CPU only with native bf16 where it
    measures faster, :func:`teacher_cache.bf16.cpu_bf16_choice`). Returns (precision, fidelity)."""
    if requested == "fp32":
        return "fp32", None
    if requested == "auto" and not images.is_cuda:
        from teacher_cache.bf16 import cpu_bf16_choice

        with torch.inference_mode():
            choice = cpu_bf16_choice(lambda: teacher(images, precision="fp32"),
                                     lambda: teacher(images, precision="bf16"), what=f"teacher {teacher.vfm}")
        print(choice.note, file=sys.stderr)
        if not choice.use:
            return "fp32", None
    fid = bf16_fidelity(teacher, images)
    if fid < threshold:
        warnings.warn(f"bf16 teacher fidelity {fid:.5f} < {threshold}: falling back to fp32")
        return "fp32", fid
    return "bf16", fid
