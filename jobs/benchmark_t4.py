"""Latency benchmark of the deploy graph, as the paper's T4 TensorRT FP16 batch-1 numbers mean it.

    python -m jobs.benchmark_t4 --size all --fp16                     # GPU + TensorRT machine
    python -m jobs.benchmark_t4 --size s --backend onnxruntime        # any machine
    python -m jobs.benchmark_t4 --size l --checkpoint best.pth --ap l=55.4 --out bench/

For each size: build the deploy model (checkpoint or random weights), export ONNX and check it
against torch with onnxruntime, build a TensorRT engine when tensorrt and CUDA exist, time each
backend (warm-up, then per-call synchronised timing of the inference call alone), count params and
GFLOPs, check that no training-only part (DSI projector, teacher) is in the graph, and compare
reduced-precision detections with fp32 ones on real images. Writes report.json, report.md and,
given --ap, ap_vs_latency.png. Without tensorrt or a GPU it says which is missing and benchmarks
the backends that exist; every number is labelled with its backend, precision and device.
"""
from __future__ import annotations

import argparse
import platform
import shlex
import sys
from pathlib import Path

from pipeline import cli
from pipeline.cli import parser

# torch, onnxruntime and the deploy runtime are imported inside the functions, after the flags are
# parsed: --help answers without loading them.


def parse_args(argv=None):
    p = parser("jobs.benchmark_t4", __doc__)
    p.add_argument("--size", nargs="+", default=None, choices=["s", "m", "l", "x", "all"],
                   help="one or more sizes, or all (default: all on a GPU; s on a CPU, where the four sizes take "
                        "several minutes and there is no TensorRT)")
    p.add_argument("--checkpoint", help="checkpoint for --size (random weights if omitted)")
    p.add_argument("--student", default="rtdetrv4", choices=["rtdetrv4", "rtdetrv2_r50"],
                   help="rtdetrv2_r50: RT-CO-DETR's RT-DETR-L (RT-DETRv2-R50vd) instead of the --size models")
    p.add_argument("--student-weights", help="rtdetrv2_r50: local transformers directory (random weights if omitted)")
    p.add_argument("--num-classes", type=int, help="None: read from the checkpoint, else 80")
    p.add_argument("--backend", default="tensorrt", choices=["tensorrt", "onnxruntime", "torch", "all"],
                   help="tensorrt falls back to onnxruntime + torch when tensorrt or CUDA is missing")
    p.add_argument("--fp16", action=argparse.BooleanOptionalAction, default=True,
                   help="TensorRT fp16 engine; also a torch autocast row (fp16 on GPU; bf16 on a CPU with native bf16 "
                        "where it measures faster, else skipped with a note)")
    p.add_argument("--cpu-bf16", choices=["auto", "on", "off"], default="auto",
                   help="torch bf16 row on a CPU: auto = only with native bf16 (AMX / AVX512-BF16) where one timed "
                        "call is faster than fp32")
    p.add_argument("--compile", action="store_true", help="also time torch.compile (slow to compile)")
    p.add_argument("--batch", type=int, default=1, help="images per timed call")
    p.add_argument("--image-size", type=int, default=640, help="network input size")
    p.add_argument("--threads", type=int, default=2, help="CPU threads for onnxruntime and torch")
    p.add_argument("--warmup", type=int, help="untimed calls per backend (None: 200 on GPU, 3 on CPU)")
    p.add_argument("--iters", type=int, help="timed calls per backend (None: 1000 on GPU, 20 on CPU)")
    p.add_argument("--images", default=None,
                   help="folder of real images for the fp16-vs-fp32 detection check (None: the embedded dataset's "
                        "val images)")
    p.add_argument("--n-images", type=int, default=8, help="images in the detection check")
    p.add_argument("--score-thr", type=float, default=0.5, help="detections compared in the fp16 check")
    p.add_argument("--ap", help="COCO AP per size for the plot: s=49.8,l=55.4 or a JSON file")
    p.add_argument("--fp32-layers", nargs="*", default=[], help="TensorRT layers pinned to fp32")
    p.add_argument("--out", default="bench", help="folder for report.json, report.md, the ONNX files")
    args = p.parse_args(argv)
    if args.size is None:
        import torch
        args.size = ["all"] if torch.cuda.is_available() else ["s"]
        if args.size == ["s"]:
            print("no GPU: --size s (give --size all for the four sizes)", file=sys.stderr)
    args.sizes = ["s", "m", "l", "x"] if "all" in args.size else list(dict.fromkeys(args.size))
    if args.student == "rtdetrv2_r50":
        args.sizes = ["rtdetrv2_r50"]
    if args.checkpoint and len(args.sizes) != 1:
        p.error("--checkpoint needs exactly one --size (s, m, l or x)")
    return args


def availability(want_backend: str) -> tuple[bool, list[dict]]:
    """(tensorrt usable, list of what is unavailable and why); prints the fallback when tensorrt was asked for."""
    import torch

    from pipeline.deploy.trt_engine import tensorrt_status

    trt_ok, trt_why = tensorrt_status()
    missing = []
    if not torch.cuda.is_available():
        missing.append({"what": "cuda", "reason": "no CUDA GPU visible to torch: GPU backends "
                        "(TensorRT, torch fp16, onnxruntime CUDA) not run"})
    if not trt_ok:
        missing.append({"what": "tensorrt", "reason": trt_why})
        if want_backend in ("tensorrt", "all"):
            print(f"TensorRT benchmark not possible: {trt_why}.\n"
                  f"Falling back to onnxruntime and torch on {'GPU' if torch.cuda.is_available() else 'CPU'}; "
                  f"every number below is labelled with its backend and device.", file=sys.stderr)
    return trt_ok, missing


def cpu_bf16_row(args, fp32, bf16, report) -> bool:
    """Whether to time a torch bf16 row on the CPU (--cpu-bf16 auto: only with native bf16 where it
    measures faster on one timing call; the reason is printed and kept in the report)."""
    if args.cpu_bf16 != "auto":
        return args.cpu_bf16 == "on"
    from teacher_cache.bf16 import cpu_bf16_choice

    feed = fp32.prepare(*_timing_batch(None, args))
    choice = cpu_bf16_choice(lambda: fp32.infer(*feed), lambda: bf16.infer(*feed), what="torch CPU row", reps=1)
    print(f"  {choice.note}")
    if not choice.use and report is not None:
        report["unavailable"].append({"what": "torch bf16 cpu", "reason": choice.note})
    return choice.use


def backends_for(args, built, onnx_path, trt_ok, report=None) -> list:
    """The backends to time, each labelled; TensorRT only when it exists."""
    import torch

    from pipeline.deploy.backends import OnnxRuntimeBackend, TensorRTBackend, TorchBackend
    from pipeline.deploy.graph import maybe_build_engine

    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    want = args.backend
    fallback = want == "tensorrt" and not trt_ok
    out = []
    if want in ("tensorrt", "all") and trt_ok:
        engine, msg = maybe_build_engine(onnx_path, args.image_size, args.fp16, max(32, args.batch),
                                         Path(args.out) / "engines", tuple(args.fp32_layers))
        print(msg)
        out.append(TensorRTBackend(engine, "fp16" if args.fp16 else "fp32"))
        if args.fp16:  # fp32 engine: reference for the fp16 detection check
            ref, _ = maybe_build_engine(onnx_path, args.image_size, False, max(32, args.batch), Path(args.out) / "engines")
            out.append(TensorRTBackend(ref, "fp32"))
    if want in ("onnxruntime", "all") or fallback:
        out.append(OnnxRuntimeBackend(onnx_path, threads=args.threads, device="cpu"))
    if want in ("torch", "all") or fallback:
        fp32 = TorchBackend(built.graph, dev, "fp32")
        out.append(fp32)
        if args.fp16 and cuda:
            out.append(TorchBackend(built.graph, dev, "fp16"))
        elif args.fp16 and cpu_bf16_row(args, fp32, TorchBackend(built.graph, dev, "bf16"), report):
            out.append(TorchBackend(built.graph, dev, "bf16"))
        if args.compile:
            out.append(TorchBackend(built.graph, dev, "fp32", compile=True))
    return out


def count_gflops(graph, image_size: int) -> float:
    """Conv/matmul GFLOPs (2 x MACs, torch.utils.flop_counter) at batch 1; grid_sample and
    element-wise ops are not counted (as with calflops, which reports 25.17 for S)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    x = torch.rand(1, 3, image_size, image_size)
    sizes = torch.tensor([[image_size, image_size]])
    with FlopCounterMode(display=False) as fc, torch.inference_mode():
        graph(x, sizes)
    return fc.get_total_flops() / 1e9


def real_images(args):
    """(images, sizes) of up to --n-images real images for the detection check, or None."""
    from pipeline.deploy.inputs import list_images, read_image, to_inputs

    if args.images is None:
        from pipeline.data.synthetic import ensure_generated
        args.images = str(ensure_generated("val") / "val")
    src = Path(args.images)
    if not src.exists():
        return None
    files = list_images(src, limit=args.n_images)
    return to_inputs([read_image(f) for f in files], args.image_size)


def divergence_checks(size, backends, batch, args, report):
    """Reduced-precision backends against the fp32 backend of the same family on real images."""
    from pipeline.deploy.compare import compare_detections, max_score

    if batch is None:
        report["warnings"].append(f"{size.upper()}: fp16 detection check skipped: no images at {args.images}")
        return
    images, sizes = batch
    outs = {b.label: b.detections(images, sizes) for b in backends}
    pairs = [(a, b) for a in backends for b in backends
             if a.precision == "fp32" and b.precision != "fp32" and a.name == b.name and a.device == b.device]
    if not pairs:
        report["warnings"].append(f"{size.upper()}: no reduced-precision backend ran; fp16 detection check not done")
    for ref_b, cand_b in pairs:
        ref = outs[ref_b.label]
        confident = max_score(ref) >= args.score_thr
        d = compare_detections(ref, outs[cand_b.label], ref_b.label, cand_b.label,
                               score_thr=args.score_thr, top_k=None if confident else 50)
        row = {"size": size, **d.to_dict()}
        if not confident:
            row["note"] = (f"no fp32 detection reaches score {args.score_thr} (random weights?): the fp32 "
                           f"top-50 were looked up among all reduced-precision detections; indicative only")
        report["divergence"].append(row)
        print(f"  {d.summary()}" + ("  (random weights: indicative only)" if not confident else ""))
        if d.diverged and confident:
            report["warnings"].append(
                f"{size.upper()}: {cand_b.label} detections diverge from {ref_b.label}: {'; '.join(d.reasons)}. "
                f"Known FP16 pitfall of D-FINE/DEIM engines (D-FINE #44): rebuild with --no-fp16, "
                f"--fp32-layers <names>, or a newer TensorRT (>= 10.6).")


def run(args) -> dict:
    import torch

    from pipeline.deploy import report as rep
    from pipeline.deploy.graph import PARITY_TOL, build_deploy_graph, build_rtdetrv2_graph, export_onnx_checked
    from pipeline.deploy.latency import busy_warning, device_info

    cuda = torch.cuda.is_available()
    torch.set_num_threads(args.threads)
    warmup = args.warmup if args.warmup is not None else (200 if cuda else 3)
    iters = args.iters if args.iters is not None else (1000 if cuda else 20)
    trt_ok, missing = availability(args.backend)
    device = device_info(cuda)
    software = {"python": platform.python_version(), "torch": torch.__version__,
                "onnxruntime": _version("onnxruntime"), "onnx": _version("onnx"),
                "tensorrt": _version("tensorrt") if trt_ok else None,
                "cuda": torch.version.cuda if cuda else None, "torch_threads": args.threads}
    command = "python -m jobs.benchmark_t4 " + " ".join(shlex.quote(a) for a in args.argv)
    report = rep.new_report(command, device, software, missing)
    if not device["is_t4"]:
        print(f"Device: {device['name']} — not a T4: latencies are not comparable with the paper's.")
    out = Path(args.out)
    images = real_images(args)
    for size in args.sizes:
        print(f"[{size.upper()}] building deploy model ({args.checkpoint or 'random weights'})")
        built = (build_rtdetrv2_graph(args.student_weights, args.num_classes) if size == "rtdetrv2_r50"
                 else build_deploy_graph(size, args.checkpoint, args.num_classes))
        info = export_onnx_checked(built, out / "onnx" / f"rtdetrv4_{size}.onnx", args.image_size, threads=args.threads)
        params = sum(p.numel() for p in built.graph.parameters())
        report["models"][size] = {"source": built.source, "num_classes": built.num_classes, "params": params,
                                  "gflops": count_gflops(built.graph, args.image_size),
                                  "training_only_parts": info["training_only_parts"], "onnx": info["onnx"],
                                  "onnx_nodes": info["graph"]["nodes"], "opset": info["graph"]["opset"]}
        report["parity"].append({"size": size, **info["parity"]})
        print(f"  params {params / 1e6:.2f} M, GFLOPs {report['models'][size]['gflops']:.2f}, "
              f"training-only parts: {info['training_only_parts'] or 'none'}; onnxruntime vs torch max diff "
              f"boxes {info['parity']['max_abs_diff_boxes']:.1e}, scores {info['parity']['max_abs_diff_scores']:.1e}")
        if size == "rtdetrv2_r50":
            from detector.rtdetrv2_student import PAPER_GFLOPS, PAPER_PARAMS_M
            report["models"][size].update(paper_params_m=PAPER_PARAMS_M, paper_gflops=PAPER_GFLOPS)
            print(f"  RT-CO-DETR paper (RT-DETR-L = RT-DETRv2-R50vd): {PAPER_PARAMS_M} M params, {PAPER_GFLOPS} GFLOPs; "
                  f"ours: {params / 1e6:.2f} M ({params / 1e6 / PAPER_PARAMS_M:.3f}x), "
                  f"{report['models'][size]['gflops']:.2f} GFLOPs ({report['models'][size]['gflops'] / PAPER_GFLOPS:.3f}x)")
        if not info["parity_ok"]:
            report["warnings"].append(f"{size.upper()}: onnxruntime differs from torch by more than {PARITY_TOL}")
        if info["training_only_parts"]:
            report["warnings"].append(f"{size.upper()}: training-only parts in the deploy graph: {info['training_only_parts']}")
        backends = backends_for(args, built, info["onnx"], trt_ok, report)
        timing_images, timing_sizes = _timing_batch(images, args)
        for b, stats in time_backends(backends, timing_images, timing_sizes, warmup, iters, args.batch).items():
            on_gpu = b.device.startswith("cuda")
            report["results"].append({"size": size, "backend": b.name, "precision": b.precision,
                                      "device": f"cuda: {device['gpu']}" if on_gpu else f"cpu: {device['cpu']}",
                                      "label": b.label, "batch": args.batch, "image_size": args.image_size,
                                      "threads": args.threads if not on_gpu else None,
                                      "latency": stats.to_dict(), "paper_t4_ms": rep.PAPER_T4_MS.get(size)})
            print(f"  {b.label} ({device['gpu'] if on_gpu else device['cpu']}): mean {stats.mean_ms:.2f} ms, "
                  f"median {stats.median_ms:.2f}, p90 {stats.p90_ms:.2f}, {stats.fps:.1f} FPS "
                  f"(paper T4 TRT-FP16: {rep.PAPER_T4_MS.get(size, '-')} ms)")
        divergence_checks(size, backends, images, args, report)
        del built, backends
    busy = busy_warning(device_info(cuda))  # load at the end, after the timed runs
    if busy:
        report["warnings"].append(busy)
    for s, a, b, x in rep.ratio_rows(report["results"]):
        print(f"ratio {s.upper()}: {a} / {b} = {x:.2f}x")
    return write_outputs(report, out, rep.load_ap(args.ap))


def time_backends(backends, images, sizes, warmup, iters, batch) -> dict:
    """GPU backends one after the other with CUDA events (as the official benchmark); CPU backends
    round-robin, so that load from other processes affects them alike."""
    from pipeline.deploy.latency import measure, measure_interleaved

    feeds = {b: b.prepare(images, sizes) for b in backends}
    stats = {}
    for b in backends:
        if b.device.startswith("cuda"):
            stats[b] = measure(lambda b=b: b.infer(*feeds[b]), warmup, iters, batch, cuda=True, progress=True)
    cpu = [b for b in backends if not b.device.startswith("cuda")]
    if cpu:
        got = measure_interleaved({b.label: (lambda b=b: b.infer(*feeds[b])) for b in cpu}, warmup, iters, batch,
                                  progress=True)
        stats.update({b: got[b.label] for b in cpu})
    return {b: stats[b] for b in backends}


def _timing_batch(images, args):
    import torch

    if images is None:
        g = torch.Generator().manual_seed(0)
        x = torch.rand(args.batch, 3, args.image_size, args.image_size, generator=g)
        return x, torch.full((args.batch, 2), args.image_size, dtype=torch.int64)
    idx = torch.arange(args.batch) % images[0].shape[0]
    return images[0][idx], images[1][idx]


def write_outputs(report: dict, out: Path, ap: dict) -> dict:
    from pipeline.deploy import report as rep

    rep.write_json(report, out / "report.json")
    (out / "report.md").write_text(rep.to_markdown(report))
    written = [out / "report.json", out / "report.md"]
    if ap:
        written.append(rep.plot_ap_latency(report, ap, out / "ap_vs_latency.png"))
    for w in report["warnings"]:
        print(f"WARNING: {w}")
    print(report["note"])
    print("wrote " + ", ".join(str(w) for w in written))
    return report


def _version(mod: str) -> str | None:
    try:
        return __import__(mod).__version__
    except Exception:
        return None


def main(argv=None) -> dict:
    args = parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    return run(args)


if __name__ == "__main__":
    sys.exit(cli.run("jobs.benchmark_t4", main))
