"""Per-token absmax int8 quantisation of teacher grids (cache_prior_art.md section 3.2).

Each token (one C-vector) is stored as int8 plus one fp16 scale. The scale is a per-token
multiplier, so the token's direction (all the DSI cosine loss sees) is kept up to int8 rounding,
and its norm is kept for correct bilinear warping. 400 tokens x (768 + 2) B = 308,000 B per view.
"""
from __future__ import annotations

import torch

DTYPES = ("int8", "float16")


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


def encode(grid: torch.Tensor, dtype: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Teacher grids [B,C,h,w] -> stored token rows [B, h*w, C] (+ scales [B, h*w] for int8)."""
    tokens = grid.flatten(2).transpose(1, 2)
    if dtype == "int8":
        return quantize_int8(tokens)
    if dtype == "float16":
        return tokens.to(torch.float16), None
    raise ValueError(f"store dtype must be one of {DTYPES}, got {dtype!r}")


def decode(tokens: torch.Tensor, scale: torch.Tensor | None, grid: tuple[int, int]) -> torch.Tensor:
    """Stored rows [..., h*w, C] (+ scales) -> float32 grids [..., C, h, w]."""
    x = dequantize_int8(tokens, scale) if scale is not None else tokens.float()
    return x.transpose(-1, -2).reshape(*x.shape[:-2], x.shape[-1], *grid)
