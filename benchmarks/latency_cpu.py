"""CPU latency of the deploy graph: onnxruntime vs torch eager (fp32, bf16 autocast) [vs torch.compile],
batch 1, 640x640, S and L, side by side in one run; prints the ratios and the CPU model.

    python -m benchmarks.latency_cpu                     # S and L, 2 threads, 20 timed calls each
    python -m benchmarks.latency_cpu --sizes s --compile --iters 30

This is the no-GPU stand-in for the T4 TensorRT table: absolute numbers depend on the CPU and
on what else runs on it, so compare the ratios. On a CPU shared with other jobs use --threads 1:
torch's OpenMP threads stall under contention (measured 10x slower with 2 threads at load 8 on 2
cores, onnxruntime 1.7x). Outputs go to --out (report.json / report.md).
"""
from __future__ import annotations

import argparse

from jobs.benchmark_t4 import main as benchmark


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", nargs="+", default=["s", "l"], choices=["s", "m", "l", "x"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--compile", action="store_true", help="add torch.compile (several minutes to compile)")
    p.add_argument("--out", default="/tmp/latency_cpu")
    a = p.parse_args()
    argv = ["--size", *a.sizes, "--backend", "all", "--threads", str(a.threads), "--warmup", str(a.warmup),
            "--iters", str(a.iters), "--out", a.out] + (["--compile"] if a.compile else [])
    report = benchmark(argv)
    print(f"\nCPU: {report['device']['cpu']}, {a.threads} threads, batch 1, 640x640, random weights")
    print(f"{'size':<5}{'backend':<44}{'mean ms':>9}{'median':>9}{'p90':>9}{'x onnxruntime':>15}")
    for size in a.sizes:
        rows = [r for r in report["results"] if r["size"] == size]
        ref = next(r for r in rows if r["backend"] == "onnxruntime")["latency"]["mean_ms"]
        for r in rows:
            lat = r["latency"]
            name = f"{r['backend']} {r['precision']}"
            print(f"{size.upper():<5}{name:<44}{lat['mean_ms']:>9.1f}{lat['median_ms']:>9.1f}"
                  f"{lat['p90_ms']:>9.1f}{lat['mean_ms'] / ref:>14.2f}x")


if __name__ == "__main__":
    main()
