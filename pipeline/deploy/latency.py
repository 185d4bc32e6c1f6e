"""Latency measurement: warm-up, then per-call synchronised timing, then summary statistics.

Mirrors what the official `tools/benchmark/trt_benchmark.py` means to measure: only the inference
call is timed (pre/post-processing outside the graph excluded; the postprocessor is inside the
graph, so it is included), with the device synchronised before and after each call, batch 1,
and the mean reported. On CUDA the call is bracketed by CUDA events, on CPU by perf_counter.
"""
from __future__ import annotations

import platform
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
import torch


@dataclass
class LatencyStats:
    """Per-call latency summary in milliseconds (`fps` = 1000 / mean * batch)."""

    mean_ms: float
    median_ms: float
    p90_ms: float
    min_ms: float
    std_ms: float
    fps: float
    n_warmup: int
    n_iters: int
    batch: int
    timer: str

    @classmethod
    def from_samples(cls, samples_ms, n_warmup: int, batch: int, timer: str) -> "LatencyStats":
        a = np.asarray(samples_ms, dtype=np.float64)
        if a.size == 0:
            raise ValueError("no timing samples: n_iters must be >= 1")
        mean = float(a.mean())
        return cls(mean_ms=mean, median_ms=float(np.median(a)), p90_ms=float(np.percentile(a, 90)),
                   min_ms=float(a.min()), std_ms=float(a.std()), fps=1000.0 * batch / mean,
                   n_warmup=n_warmup, n_iters=int(a.size), batch=batch, timer=timer)

    def to_dict(self) -> dict:
        return asdict(self)


def measure(fn: Callable[[], object], n_warmup: int = 10, n_iters: int = 50, batch: int = 1,
            cuda: bool = False, progress: bool = False) -> LatencyStats:
    """Time `fn()` alone, `n_iters` times after `n_warmup` untimed calls.

    With `cuda=True` every call is bracketed by CUDA events on the current stream and the
    device is synchronised before each call, so queued work from earlier calls is not counted.
    """
    for _ in range(n_warmup):
        fn()
    iters = range(n_iters)
    if progress:
        from tqdm import tqdm
        iters = tqdm(iters, desc="timing", unit="call", leave=False, disable=None)
    samples = []
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        for _ in iters:
            torch.cuda.synchronize()
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
        timer = "cuda-events"
    else:
        for _ in iters:
            t0 = time.perf_counter_ns()
            fn()
            samples.append((time.perf_counter_ns() - t0) / 1e6)
        timer = "perf_counter"
    return LatencyStats.from_samples(samples, n_warmup, batch, timer)


def measure_interleaved(fns: dict[str, Callable[[], object]], n_warmup: int = 3, n_iters: int = 20,
                        batch: int = 1, progress: bool = False) -> dict[str, LatencyStats]:
    """CPU timing of several backends round-robin (call 1 of each, then call 2 of each, ...), so a
    change in machine load hits all of them alike and their ratios stay meaningful."""
    say = _Progress(progress)
    for k, fn in fns.items():
        say(f"warm-up {k}: {n_warmup} calls", force=True)
        for _ in range(n_warmup):
            fn()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    start = time.perf_counter()
    for i in range(n_iters):
        for k, fn in fns.items():
            t0 = time.perf_counter_ns()
            fn()
            samples[k].append((time.perf_counter_ns() - t0) / 1e6)
        eta = (time.perf_counter() - start) / (i + 1) * (n_iters - i - 1)
        say(f"timing round {i + 1}/{n_iters}: " + ", ".join(f"{k} {v[-1]:.0f} ms" for k, v in samples.items())
            + f"; ETA {eta:.0f} s", force=i == 0)
    return {k: LatencyStats.from_samples(v, n_warmup, batch, "perf_counter, round-robin") for k, v in samples.items()}


class _Progress:
    """Progress lines on stderr at most every ``every_s`` seconds (plain lines, so they also show in
    a log file, where a tqdm bar stays silent)."""

    def __init__(self, enabled: bool, every_s: float = 15.0):
        self.enabled, self.every_s, self.last = enabled, every_s, -float("inf")

    def __call__(self, line: str, force: bool = False) -> None:
        now = time.perf_counter()
        if self.enabled and (force or now - self.last >= self.every_s):
            print(f"  {line}", file=sys.stderr, flush=True)
            self.last = now


def cpu_name() -> str:
    """CPU model from /proc/cpuinfo (falls back to platform.processor())."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_info(cuda: bool) -> dict:
    """Describe the device a measurement ran on; `is_t4` tells whether it is comparable to the paper."""
    import os
    info = {"cpu": cpu_name(), "cpu_threads_available": os.cpu_count(), "gpu": None, "is_t4": False,
            "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}
    if cuda and torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        cc = torch.cuda.get_device_capability()
        info.update(gpu=name, compute_capability=f"{cc[0]}.{cc[1]}", is_t4="T4" in name)
    info["name"] = info["gpu"] or info["cpu"]
    return info


def busy_warning(info: dict) -> str | None:
    """A warning when other processes load the CPU (timings then measure contention, not the model)."""
    load, cores = info.get("load_avg_1m"), info.get("cpu_threads_available") or 1
    if load is not None and load > cores:
        return (f"CPU busy during the run: 1-minute load average {load:.1f} on {cores} cores; "
                f"CPU timings are inflated by contention, compare ratios only")
    return None
