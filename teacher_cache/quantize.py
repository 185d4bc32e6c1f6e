"""Per-token absmax int8 quantisation (the default) and a 4-bit format of teacher grids.

Each token (one C-vector) is stored as int8 plus one fp16 scale. The scale is a per-token
multiplier, so the token's direction (all the DSI cosine loss sees) is kept up to int8 rounding,
and its norm is kept for correct bilinear warping. 400 tokens x (768 + 2) B = 308,000 B per view.
"""
from __future__ import annotations

from functools import lru_cache

import torch

DTYPES = ("int8", "int4", "float16")
INT4_GROUP = 128  # channels per fp16 scale: 768 ch -> 384 B of nibbles + 12 B of scales per token


def quantize_int8(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """tokens [..., C] float -> (int8 [..., C], fp16 scale [...])."""
    x = tokens.float()
    scale = (x.abs().amax(dim=-1) / 127.0).to(torch.float16)
    # quantise with the rounded scale the reader will use; an all-zero token keeps scale 0
    s = scale.float().clamp_min(torch.finfo(torch.float16).tiny).unsqueeze(-1)
    q = torch.round(x / s).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale.float().unsqueeze(-1)


# Lloyd-Max levels of N(0, 1) for 16 codes (positive half): the MSE-optimal 4-bit scalar code
_LLOYD_MAX = (0.1284, 0.3881, 0.6568, 0.9424, 1.2562, 1.6181, 2.0690, 2.7326)
_ROTATION_SEED = 0x0DD


@lru_cache(maxsize=8)
def _rotation(dim: int, device: str = "cpu") -> torch.Tensor:
    """A fixed random orthogonal [C, C] (seeded QR on the CPU, then kept on ``device``): it spreads a
    VFM's few high-magnitude channels over all channels, so every group is near-Gaussian; cosines
    are unchanged by it."""
    if device != "cpu":
        return _rotation(dim).to(device)
    g = torch.Generator().manual_seed(_ROTATION_SEED)
    q, r = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).float()


def _levels(device) -> torch.Tensor:
    half = torch.tensor(_LLOYD_MAX, device=device)
    return torch.cat([-half.flip(0), half])


def quantize_int4(tokens: torch.Tensor, group: int = INT4_GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """tokens [..., C] -> (uint8 [..., C/2], two 4-bit codes per byte; fp16 scale [..., C/group]).
    Rotated by :func:`_rotation`, then per group of ``group`` channels scaled by its RMS and coded
    with the 16 Lloyd-Max levels of a unit Gaussian (QuaRot/NF4-style rotation + codebook)."""
    C = tokens.shape[-1]
    if C % group or group % 2:
        raise ValueError(f"int4 needs the channel count {C} to be a multiple of the group {group}")
    y = tokens.float() @ _rotation(C, str(tokens.device))
    g = y.unflatten(-1, (C // group, group))
    scale = g.pow(2).mean(-1).sqrt().to(torch.float16)
    s = scale.float().clamp_min(torch.finfo(torch.float16).tiny).unsqueeze(-1)
    levels = _levels(tokens.device)
    # nearest level = count of midpoints below the value (bucketize: no [.., 16] temporary)
    code = torch.bucketize(g / s, (levels[1:] + levels[:-1]) / 2).flatten(-2).to(torch.uint8)
    return code[..., 0::2] | (code[..., 1::2] << 4), scale


def dequantize_int4(packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    code = torch.stack([packed & 0x0F, packed >> 4], dim=-1).flatten(-2).long()
    y = _levels(packed.device)[code].unflatten(-1, (scale.shape[-1], -1)) * scale.float().unsqueeze(-1)
    return y.flatten(-2) @ _rotation(y.shape[-2] * y.shape[-1], str(packed.device)).T


def bytes_per_token(dtype: str, dim: int) -> int:
    return {"int8": dim + 2, "int4": dim // 2 + 2 * (dim // INT4_GROUP), "float16": 2 * dim}[dtype]


def encode(grid: torch.Tensor, dtype: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Teacher grids [B,C,h,w] -> stored token rows [B, h*w, C] (+ scales [B, h*w] for int8;
    int4: packed rows [B, h*w, C/2] + group scales [B, h*w, C/128])."""
    tokens = grid.flatten(2).transpose(1, 2)
    if dtype == "int8":
        return quantize_int8(tokens)
    if dtype == "int4":
        return quantize_int4(tokens)
    if dtype == "float16":
        return tokens.to(torch.float16), None
    raise ValueError(f"store dtype must be one of {DTYPES}, got {dtype!r}")


def decode(tokens: torch.Tensor, scale: torch.Tensor | None, grid: tuple[int, int]) -> torch.Tensor:
    """Stored rows [..., h*w, C] (+ scales) -> float32 grids [..., C, h, w]; the format follows
    from the rows' dtype (int8, uint8 = packed int4, float16). Runs on the tensors' device."""
    if tokens.dtype == torch.uint8:
        x = dequantize_int4(tokens, scale)
    else:
        x = dequantize_int8(tokens, scale) if scale is not None else tokens.float()
    return x.transpose(-1, -2).reshape(*x.shape[:-2], x.shape[-1], *grid)
