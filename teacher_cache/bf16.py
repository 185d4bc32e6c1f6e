"""Whether bf16 pays off on this CPU: the one rule the teacher, the trainer and the benchmark share.

bf16 on a CPU is only worth it with native bf16 arithmetic (AMX or AVX512-BF16, as oneDNN uses
them); without it PyTorch emulates bf16 and a detector runs many times slower than in fp32 (35x
measured on an AMD EPYC without AVX512-BF16, issue 13). Even with the flags, a short side-by-side
measurement of the actual work decides, since small or memory-bound models can still lose.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


@lru_cache(maxsize=1)
def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> frozenset[str]:
    """The CPU feature flags of the first core (empty where /proc/cpuinfo does not exist)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def native_bf16_flags() -> list[str]:
    """The native-bf16 flags this CPU has (AMX / AVX512-BF16); torch's own capability string
    counts too (``AVX512_BF16`` / ``AMX`` where it reports them)."""
    found = [f for f in NATIVE_BF16_FLAGS if f in cpu_flags()]
    if not found:
        import torch

        cap = torch.backends.cpu.get_cpu_capability().lower()   # e.g. 'avx512', 'avx512_bf16', 'amx'
        found = [cap] if ("bf16" in cap or "amx" in cap) else []
    return found


@dataclass(frozen=True)
class Bf16Choice:
    use: bool
    note: str       # one line saying why, for the console and the reports


def _best_seconds(fn: Callable[[], object], reps: int) -> float:
    fn()  # warm-up (oneDNN primitive creation)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def cpu_bf16_choice(fp32: Callable[[], object], bf16: Callable[[], object], what: str = "bf16",
                    reps: int = 2, margin: float = 0.9) -> Bf16Choice:
    """bf16 on the CPU only if the CPU has native bf16 AND ``bf16()`` measures at least 10%
    faster than ``fp32()`` (best of ``reps`` calls each, after one warm-up); otherwise fp32.
    The flags are checked first, so a CPU without native bf16 never runs the slow emulation."""
    flags = native_bf16_flags()
    if not flags:
        return Bf16Choice(False, f"{what}: fp32 (this CPU has no native bf16, no AMX / AVX512-BF16: "
                                 "bf16 would be emulated and many times slower)")
    t32, t16 = _best_seconds(fp32, reps), _best_seconds(bf16, reps)
    if t16 <= margin * t32:
        return Bf16Choice(True, f"{what}: bf16 (native {'/'.join(flags)}; measured {1000 * t16:.1f} ms "
                                f"vs fp32 {1000 * t32:.1f} ms)")
    return Bf16Choice(False, f"{what}: fp32 (native {'/'.join(flags)} but bf16 measured {1000 * t16:.1f} ms vs "
                             f"fp32 {1000 * t32:.1f} ms: not faster)")
