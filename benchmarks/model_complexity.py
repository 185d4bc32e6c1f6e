"""Parameters and GFLOPs of RT-DETRv4-S/M/L/X in deploy form at 640x640, next to the official numbers.

Official: tools/benchmark/get_info.py (calflops on model.deploy(), 1x3x640x640), parameters without
the training-only DSI projector (reference §1.1). Ours: parameters of RTDETRv4.deploy(); FLOPs from
torch.utils.flop_counter.FlopCounterMode = 2 x multiply-accumulates of convolutions and matrix
products. Two columns: "all" includes the attention score/value batched matmuls (aten.bmm: AIFI and
decoder self-attention), "no-attn" leaves them out. calflops does not count those attention matmuls
but does count element-wise ops (activations, softmax, grid_sample, ...), so it sits between the two;
"no-attn" is the like-for-like comparison with the official figure.

    python -m benchmarks.model_complexity [--sizes s m l x] [--size 640]
"""
from __future__ import annotations

import argparse

import torch
from torch.utils.flop_counter import FlopCounterMode

from detector import build_detector

OFFICIAL = {  # deploy params (M), calflops GFLOPs, calflops GMACs @640 (reference §1.1)
    "s": (10.24, 25.17, 12.53), "m": (19.25, 56.68, 28.26), "l": (30.77, 91.14, 45.45), "x": (61.70, 202.67, 101.15)}


def measure(size: str, px: int = 640) -> tuple[float, float, float]:
    """(deploy params M, GFLOPs all, GFLOPs without attention bmm)."""
    model = build_detector(size).deploy()
    params = sum(p.numel() for p in model.parameters()) / 1e6
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(torch.rand(1, 3, px, px))
    total = counter.get_total_flops()
    attention = sum(v for op, v in counter.get_flop_counts()["Global"].items() if "bmm" in str(op))
    return params, total / 1e9, (total - attention) / 1e9


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", default=["s", "m", "l", "x"])
    ap.add_argument("--size", type=int, default=640)
    args = ap.parse_args()
    print(f"deploy form, 1x3x{args.size}x{args.size}, fp32; FLOPs = 2 x MACs (FlopCounterMode); official = calflops")
    print(f"{'size':<5}{'params M':>10}{'official':>10}{'ratio':>8}{'GFLOPs all':>12}{'no-attn':>9}{'official':>10}"
          f"{'ratio no-attn':>15}{'ratio all':>11}")
    for s in args.sizes:
        params, gflops, no_attn = measure(s, args.size)
        p0, f0, _ = OFFICIAL[s]
        print(f"{s.upper():<5}{params:>10.3f}{p0:>10.2f}{params / p0:>8.4f}{gflops:>12.2f}{no_attn:>9.2f}{f0:>10.2f}"
              f"{no_attn / f0:>15.4f}{gflops / f0:>11.4f}")


if __name__ == "__main__":
    main()
