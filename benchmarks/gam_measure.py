"""GAM per-step measurement: released loop (one ``.item()`` per parameter tensor) vs ours
(``torch._foreach_norm`` + device accumulation, no host sync), on a real RT-DETRv4 gradient set.

Prints both shares (they must agree to float32 rounding), the time per step of each and the ratio.
On CPU ``.item()`` costs no device sync, so the ratio here is a lower bound of the GPU gain.

    python -m benchmarks.gam_measure [--size s] [--steps 20] [--device cpu]
"""
from __future__ import annotations

import argparse
import math
import time

import torch

from detector import build_detector
from detector.gam import GAM, GAMConfig


def released_share(model) -> float:
    """The released det_engine loop restated (with our non-DDP names)."""
    total = enc = 0.0
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        v = p.grad.detach().abs().sum().item()
        total += v
        if name.startswith("encoder.encoder"):
            enc += v
    return 0.0 if total <= 0 or not math.isfinite(total) else 100.0 * enc / total


def _time(fn, steps, device):
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / steps


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="s")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = ap.parse_args()
    device = torch.device(a.device)
    torch.manual_seed(0)
    model = build_detector(a.size).to(device)
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.randn_like(p)
    gam = GAM(GAMConfig.for_size(a.size))
    ref, ours = released_share(model), gam.step_share(model).item()
    t_ref = _time(lambda: released_share(model), a.steps, device)
    t_ours = _time(lambda: gam.measure(model), a.steps, device)
    n = sum(p.grad is not None for p in model.parameters())
    print(f"RT-DETRv4-{a.size.upper()} on {device}: {n} gradient tensors")
    print(f"share released {ref:.6f}%  ours {ours:.6f}%  |diff| {abs(ref - ours):.2e}")
    print(f"per step: released {t_ref * 1e3:.2f} ms ({n} host syncs)  ours {t_ours * 1e3:.2f} ms (0 syncs)"
          f"  ratio {t_ref / t_ours:.1f}x")


if __name__ == "__main__":
    main()
