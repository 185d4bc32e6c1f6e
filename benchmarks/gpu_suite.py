"""Everything that needs a GPU, in two device calls on one GPU (docs/gpu.md; ~12 minutes as measured on an H200).

    python -m benchmarks.gpu_suite --sections tests cache train_runs throughput deploy --out $OUT   # <= 8 min
    python -m benchmarks.gpu_suite --sections recipe_parity convergence --out $OUT                 # <= 9 min
    python -m benchmarks.gpu_suite --dry-run --out /tmp/s  # every section's code paths on the CPU, tiny

Sections, each in its own process under its own time budget (a section that fails or runs out of
time is recorded with what it finished, and the suite goes on):

1. ``tests``: ``pytest -m gpu`` (every CUDA-marked test).
2. ``cache``: ``jobs.cache_teacher`` (exact mode, in-process, no Ray) views/s on the GPU against the
   teacher's forward-only views/s at the same batch and precision (target >= 0.8); its store feeds 3.
3. ``train_runs``: 20-step ``jobs.train`` runs of S: bf16, fp16 + GradScaler, and bf16 with the
   exact cache of 2.
4. ``throughput``: training samples/s at 640, batch 16, S and L: no distillation, online teacher
   (ViT-B fp32 as official, and bf16), exact cache; peak memory of each; modes stepped round-robin.
5. ``deploy``: latency at batch 1, 640, S/M/L/X: torch fp16 eager, ``torch.compile``, CUDA graph
   replay, onnxruntime-gpu (CUDA execution provider) where it is installed; labelled with the
   device (never as T4 numbers).
6. ``recipe_parity``: ``benchmarks/recipe_parity.py`` at 640 (batch 16, 17 epochs of 64 images):
   ours against the official training code (``.official/RT-DETRv4`` when present, else our side
   only), without distillation and with DSI + GAM, the seed band (ours with seeds 0-3), and the cached
   against the online teacher; its tables go to ``recipe_parity.txt`` in ``--out``.
7. ``convergence``: ``benchmarks/convergence.py`` at 640 (S from scratch, batch 16, 300 steps):
   val AP / AP50 per epoch; its table goes to ``convergence.txt``.

Sections 1-5 and 6-7 are two device calls of at most 10 minutes each (docs/gpu.md).

Writes ``gpu_suite.json`` (device name, driver, torch/CUDA versions, every record) and
``gpu_suite.md`` (one table) to ``--out`` (default ``$OUT``). ``--dry-run``: CPU, tiny image size,
2 steps, size s only, no compile (CUDA graphs and CUDA-only records are marked skipped).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
# seconds per section: sections 1-5 (one device call; 229-260 s measured) stay under 8 minutes with process
# start-up, 6-7 (a second call; 225 s with two seeds + 172 s measured) under 9
BUDGETS = {"tests": 60, "cache": 90, "train_runs": 100, "throughput": 120, "deploy": 85,
           "recipe_parity": 330, "convergence": 200}
DRY_BUDGETS = {"tests": 150, "cache": 300, "train_runs": 400, "throughput": 400, "deploy": 300,
               "recipe_parity": 400, "convergence": 300}


# ------------------------------------------------------------------------------------------ plan
def plan(dry: bool) -> dict:
    """Sizes of every section: the GPU plan, or the tiny CPU one of --dry-run."""
    if dry:
        return dict(device="cpu", img=160, deploy_img=160, batch=2, steps=2, train_steps=2, sizes=["s"],
                    deploy_sizes=["s"], amps=["off"], compile=False, warmup=1, iters=2, render_workers=1,
                    pytest=["tests/detector/test_criterion.py"],
                    parity=dict(img=192, batch=2, epochs=2, train_images=2, eval_images=2, jobs=2, threads=1, workers=0,
                                vfm="dinov3_vits", distill=["dsi"], seeds=[0]),
                    convergence=dict(img=192, batch=2, epochs=1, steps=2, train_images=16, eval_images=4, workers=0))
    return dict(device="cuda", img=640, deploy_img=640, batch=16, steps=6, train_steps=20, sizes=["s", "l"],
                deploy_sizes=["s", "m", "l", "x"], amps=["bf16", "fp16"], compile=True,
                warmup=10, iters=50, pytest=["tests"], render_workers=8,
                parity=dict(img=640, batch=16, epochs=17, train_images=64, eval_images=64, jobs=7, threads=2, workers=2,
                            vfm="dinov3_vitb", distill=["none", "dsi"], seeds=[0, 1, 2, 3]),
                convergence=dict(img=640, batch=16, epochs=10, steps=30, train_images=1024, eval_images=64, workers=4))


class Records:
    """Append-only JSON lines, so a section killed at its budget keeps what it finished."""

    def __init__(self, path: Path, section: str):
        self.path, self.section = path, section

    def __call__(self, name: str, **fields) -> dict:
        rec = {"section": self.section, "name": name, **fields}
        with open(self.path, "a") as f:
            f.write(json.dumps(rec, default=str) + "\n")
        print(f"[{self.section}] {name}: " + ", ".join(f"{k}={_fmt(v)}" for k, v in fields.items()), flush=True)
        return rec


def _fmt(v):
    return f"{v:.4g}" if isinstance(v, float) else v


def _sync(device: str) -> None:
    import torch
    if device == "cuda":
        torch.cuda.synchronize()


def _peak_reset(device: str) -> None:
    import torch
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()


def _peak_gib(device: str):
    import torch
    return torch.cuda.max_memory_allocated() / 2 ** 30 if device == "cuda" else None


# -------------------------------------------------------------------------------------- sections
def gpu_test_files(paths: list[str]) -> list[str]:
    """The test modules that hold a ``gpu``-marked test: collecting only these keeps modules whose
    imports the GPU image lacks (moto, s3fs, ray, ...) from turning the section into a failure."""
    files = [f for d in paths for f in sorted((REPO / d).rglob("test_*.py")) if (REPO / d).is_dir()]
    files += [REPO / d for d in paths if (REPO / d).is_file()]
    return [str(f.relative_to(REPO)) for f in files if "mark.gpu" in f.read_text()]


def section_tests(p: dict, work: Path, rec: Records) -> None:
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rfEs", "-p", "no:cacheprovider",
           *gpu_test_files(p["pytest"])]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    tail = (r.stdout + r.stderr)[-3000:]
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|error|errors|deselected)", tail)}
    rec("pytest -m gpu", status="ok" if r.returncode in (0, 5) else "failed", rc=r.returncode, **counts,
        tail=tail[-1200:])


def _cache_args(p: dict, store: Path, size: str) -> list[str]:
    return ["--out", str(store), "--size", size, "--epochs", "1", "--input-size", str(p["img"]),
            "--global-batch", str(p["batch"]), "--teacher-batch", str(p["batch"]),
            "--steps-per-block", str(p["train_steps"]), "--max-shards", "1", "--no-ray", "--quiet",
            "--render-workers", str(p["render_workers"]), "--precision", "bf16" if p["device"] == "cuda" else "fp32"]


def _store(work: Path, size: str) -> Path:
    """The exact store of size ``size``'s plan (the plan follows the size's recipe: one per size)."""
    return work / f"exact_cache_{size}"


def section_cache(p: dict, work: Path, rec: Records) -> None:
    import contextlib
    import io
    import torch
    from jobs import cache_teacher
    from teacher_cache.teachers import build_teacher
    views = p["train_steps"] * p["batch"]
    precision = "bf16" if p["device"] == "cuda" else "fp32"
    loop = {}
    for size in p["sizes"]:
        t0 = time.perf_counter()
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            cache_teacher.main(_cache_args(p, _store(work, size), size))
        _sync(p["device"])
        if size == p["sizes"][0]:
            job_s = time.perf_counter() - t0
        found = re.search(r"= ([\d.]+) views/s", printed.getvalue())   # the job's own rate, start-up excluded
        loop[size] = float(found.group(1)) if found else None
    teacher = build_teacher("dinov3_vitb", precision=precision).to(p["device"])
    x = torch.rand(p["batch"], 3, p["img"], p["img"], device=p["device"])
    teacher(x)
    _sync(p["device"])
    t0 = time.perf_counter()
    for _ in range(p["train_steps"]):
        teacher(x)
    _sync(p["device"])
    fwd_s = time.perf_counter() - t0
    job, fwd, steady = views / job_s, views / fwd_s, loop[p["sizes"][0]]
    rec("cache_teacher vs forward-only", status="ok", views=views, batch=p["batch"], precision=precision,
        render_workers=p["render_workers"], job_views_per_s=job, loop_views_per_s=steady,
        forward_views_per_s=fwd, ratio=(steady or 0.0) / fwd, target=0.8,
        note="ratio: the job's render+teacher+write loop (its printed views/s) over the teacher's "
             "forward alone; job_views_per_s adds process start-up, data set hashing and teacher build")


def section_train_runs(p: dict, work: Path, rec: Records) -> None:
    store = _store(work, "s")
    runs = [(f"jobs.train S {amp}", amp, None) for amp in p["amps"]]
    runs.append((f"jobs.train S {p['amps'][0]} + exact cache", p["amps"][0], store))
    for name, amp, cache in runs:
        if cache is not None and not store.exists():
            rec(name, status="skipped", reason="no store (the cache section did not finish)")
            continue
        out = work / re.sub(r"\W+", "_", name)
        cmd = [sys.executable, "-m", "jobs.train", "--size", "s", "--epochs", "1", "--img-size", str(p["img"]),
               "--batch-size", str(p["batch"]), "--max-steps-per-epoch", str(p["train_steps"]), "--amp", amp,
               "--device", p["device"], "--workers", "2", "--eval-max-images", str(p["batch"]), "--out", str(out),
               "--teacher-precision", "bf16" if p["device"] == "cuda" else "fp32"]
        if cache is not None:
            # not --strict-cache: the loader's prefetch reads past --max-steps-per-epoch, beyond the
            # cached steps; the hit rate of the logged steps is the check
            cmd += ["--cache", str(cache)]
        t0 = time.perf_counter()
        r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        metrics = _last_metrics(out)
        rec(name, status="ok" if r.returncode == 0 else "failed", rc=r.returncode,
            seconds=time.perf_counter() - t0, loss=metrics.get("loss"), samples_per_s=metrics.get("samples_per_s"),
            cache_hit_rate=metrics.get("cache_hit_rate"),
            tail=(r.stdout + r.stderr)[-800:] if r.returncode else "")


def _last_metrics(out: Path) -> dict:
    path = out / "metrics.jsonl"
    if not path.is_file():
        return {}
    lines = path.read_text().strip().splitlines()
    return json.loads(lines[-1]) if lines else {}


def section_throughput(p: dict, work: Path, rec: Records) -> None:
    import torch
    from pipeline.train.config import TrainConfig
    from pipeline.train.trainer import Trainer
    for size in p["sizes"]:
        store = _store(work, size)
        base = dict(size=size, epochs=1, img_size=p["img"], batch_size=p["batch"], workers=2, device=p["device"],
                    amp=p["amps"][0])
        modes = {"none": dict(distill="none"),
                 "online fp32": dict(distill="dsi", teacher_precision="fp32"),
                 "online bf16": dict(distill="dsi", teacher_precision="bf16")}
        if store.exists():
            modes["cache"] = dict(distill="dsi", cache=str(store), teacher_precision="bf16")
        runs = {}
        for mode, extra in modes.items():
            try:
                trainer = Trainer(TrainConfig(out=str(work / f"tp_{size}_{mode.replace(' ', '_')}"), **base, **extra))
                trainer.model.train()
                if mode == "online bf16":   # a random-init ViT fails the bf16 fidelity gate (fp32 fallback):
                    trainer.data.online_teacher().precision = "bf16"   # the speed of bf16 is what is measured
                loader = iter(trainer.data.train_loader(0, 0))
                batches = [next(loader) for _ in range(p["steps"])]
                _peak_reset(p["device"])
                trainer.train_step(*batches[0])     # untimed warm-up; its peak memory is a step's
                _sync(p["device"])
                runs[mode] = (trainer, batches[1:], _peak_gib(p["device"]))
            except Exception as e:  # noqa: BLE001 - a mode that cannot run is recorded, not fatal
                rec(f"train {size.upper()} {mode}", status="failed", error=f"{type(e).__name__}: {e}"[:500])
        spent = dict.fromkeys(runs, 0.0)
        order = list(runs)
        for step in range(p["steps"] - 1):
            order = order[1:] + order[:1]
            for mode in order:
                trainer, batches, _ = runs[mode]
                _sync(p["device"])
                t0 = time.perf_counter()
                trainer.train_step(*batches[step])
                _sync(p["device"])
                spent[mode] += time.perf_counter() - t0
        for mode, (trainer, _, peak) in runs.items():
            n = (p["steps"] - 1) * p["batch"]
            teacher = trainer.data.teacher
            rec(f"train {size.upper()} {mode}", status="ok", img=p["img"], batch=p["batch"], amp=p["amps"][0],
                samples_per_s=n / spent[mode], peak_mem_gib=peak,
                teacher_precision=None if teacher is None else teacher.precision,
                cache_hit_rate=trainer.data.teacher_stats().get("cache_hit_rate"))
            del trainer
        runs.clear()
        if p["device"] == "cuda":
            torch.cuda.empty_cache()


def section_deploy(p: dict, work: Path, rec: Records) -> None:
    import torch
    from pipeline.deploy.backends import TorchBackend
    from pipeline.deploy.graph import build_deploy_graph
    from pipeline.deploy.latency import device_info, measure
    info = device_info(p["device"] == "cuda")
    cuda = p["device"] == "cuda"
    precision = "fp16" if cuda else "fp32"
    img = p["deploy_img"]
    for size in p["deploy_sizes"]:
        built = build_deploy_graph(size)
        images = torch.rand(1, 3, img, img)
        sizes = torch.tensor([[img, img]])
        common = dict(device=info["name"], is_t4=info["is_t4"], size=size, batch=1, img=img)
        eager = TorchBackend(built.graph, p["device"], precision)
        x = eager.prepare(images, sizes)
        stats = measure(lambda: eager.infer(*x), p["warmup"], p["iters"], cuda=cuda)
        rec(f"{size.upper()} torch {precision} eager", status="ok", median_ms=stats.to_dict().get("median_ms"),
            **common)
        if cuda:
            try:
                replay = cuda_graph(eager, *x)
                stats = measure(replay, p["warmup"], p["iters"], cuda=True)
                rec(f"{size.upper()} CUDA graph {precision}", status="ok", median_ms=stats.to_dict().get("median_ms"),
                    **common)
            except Exception as e:  # noqa: BLE001
                rec(f"{size.upper()} CUDA graph {precision}", status="failed", error=f"{type(e).__name__}: {e}"[:500],
                    **common)
        else:
            rec(f"{size.upper()} CUDA graph", status="skipped", reason="needs CUDA", **common)
        onnx_latency(built, size, img, images, sizes, p, work, rec, common)
        del built, eager
        if cuda:
            torch.cuda.empty_cache()
    for size in p["deploy_sizes"]:   # last: compiling takes tens of seconds per model
        common = dict(device=info["name"], is_t4=info["is_t4"], size=size, batch=1, img=img)
        name = f"{size.upper()} torch.compile {precision}"
        if not p["compile"]:
            rec(name, status="skipped", reason="--dry-run: no compile", **common)
            continue
        try:
            t0 = time.perf_counter()
            comp = TorchBackend(build_deploy_graph(size).graph, p["device"], precision, compile=True)
            x = comp.prepare(torch.rand(1, 3, img, img), torch.tensor([[img, img]]))
            comp.infer(*x)   # compiles
            _sync(p["device"])
            compile_s = time.perf_counter() - t0
            stats = measure(lambda: comp.infer(*x), 3, p["iters"], cuda=cuda)
            rec(name, status="ok", median_ms=stats.to_dict().get("median_ms"), compile_s=compile_s, **common)
        except Exception as e:  # noqa: BLE001
            rec(name, status="failed", error=f"{type(e).__name__}: {e}"[:500], **common)


def cuda_graph(backend, images, sizes):
    """Capture one inference of ``backend`` (static inputs) and return its replay."""
    import torch
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            backend.infer(images, sizes)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.inference_mode(), torch.cuda.graph(graph):
        backend.infer(images, sizes)
    return graph.replay


def onnx_latency(built, size, img, images, sizes, p, work, rec, common) -> None:
    name = f"{size.upper()} onnxruntime {'CUDA EP' if p['device'] == 'cuda' else 'CPU EP (dry run)'}"
    try:
        import onnxruntime as ort
    except ImportError:
        rec(name, status="skipped", reason="onnxruntime not installed", **common)
        return
    if p["device"] == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
        rec(name, status="skipped", reason=f"onnxruntime-gpu not installed (providers: "
            f"{ort.get_available_providers()})", **common)
        return
    from detector.deploy import export_onnx
    from pipeline.deploy.backends import OnnxRuntimeBackend
    from pipeline.deploy.latency import measure
    path = work / f"rtdetrv4_{size}.onnx"
    try:
        export_onnx(built.graph.model, built.graph.postprocessor, path, size=img, check=False)
        backend = OnnxRuntimeBackend(path, device=p["device"])
        feeds = backend.prepare(images, sizes)
        stats = measure(lambda: backend.infer(*feeds), p["warmup"], p["iters"])
        rec(name, status="ok", median_ms=stats.to_dict().get("median_ms"), fp="fp32", **common)
    except Exception as e:  # noqa: BLE001
        rec(name, status="failed", error=f"{type(e).__name__}: {e}"[:500], **common)


def _logged(cmd: list[str], log: Path) -> tuple[int, str]:
    """Run a benchmark with its output written to ``log`` as it comes: a section killed at its budget
    still leaves what the benchmark printed so far in ``--out``."""
    with open(log, "w") as f:
        rc = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT).returncode
    return rc, log.read_text(errors="replace")


def section_recipe_parity(p: dict, work: Path, rec: Records) -> None:
    q, official = p["parity"], REPO / ".official" / "RT-DETRv4"
    sides = ["official", "ours", "cached"] if official.is_dir() else ["ours", "cached"]
    if not official.is_dir():
        rec("official side", status="skipped", reason=f"no official checkout at {official} (docs/gpu.md)")
    out = work / "parity"
    cmd = [sys.executable, "-m", "benchmarks.recipe_parity", "--sides", *sides, "--distill", *q["distill"],
           "--seeds", *map(str, q["seeds"]), "--jobs", str(q["jobs"]), "--out", str(out), "--device", p["device"]]
    flags = {"img": "--img-size", "batch": "--batch-size", "epochs": "--epochs", "train_images": "--train-images",
             "eval_images": "--eval-images", "threads": "--threads", "workers": "--workers", "vfm": "--vfm"}
    cmd += [a for k, flag in flags.items() for a in (flag, str(q[k]))]
    cmd += ["--official-src", str(official)] if official.is_dir() else []
    t0 = time.perf_counter()
    rc, text = _logged(cmd, rec.path.parent / "recipe_parity.txt")
    if rc or not (out / "parity.json").is_file():
        rec("recipe parity", status="failed", rc=rc, tail=text[-1200:])
        return
    result = json.loads((out / "parity.json").read_text())
    for mode, m in result["modes"].items():
        v, by = m["verdict"], {(x["side"], x["seed"]): x for x in m["runs"]}
        ours, off = by.get(("ours", 0)), by.get(("official", 0))
        rec(f"recipe parity, distill {mode}", status="ok", seconds=time.perf_counter() - t0,
            same_init=None if off is None else off["init"] == ours["init"],
            ap_inside_band=f"{v['ap_inside_band']}/{v['epochs']}", final_ap=ours["epochs"][-1]["AP"],
            final_ap_official=None if off is None else off["epochs"][-1]["AP"], max_loss_rel=v["max_loss_rel"],
            max_lr_rel=v["max_lr_rel"], max_lambda_rel=v["max_lambda_rel"], reloads_same=v["reloads_same"])
        if "cache_verdict" in m:
            c, cached = m["cache_verdict"], by[("ours cached", 0)]
            rec("cached vs online teacher", status="ok", same_init=cached["init"] == ours["init"],
                max_step_loss_diff=c["max_step_loss_diff"], same_student_distill_diff=c["same_student_distill_diff"],
                same_student_distill_rel=c["same_student_distill_rel"],
                same_student_target_rel=c["same_student_target_rel"], final_ap=cached["epochs"][-1]["AP"],
                ap_inside_band=f"{c['ap_inside_band']}/{c['epochs']}",
                cache_hit_rate=cached["epochs"][-1]["exact_hits"])


def section_convergence(p: dict, work: Path, rec: Records) -> None:
    from pipeline.train.outputs import read_results
    q, out = p["convergence"], work / "convergence"
    cmd = [sys.executable, "-m", "benchmarks.convergence", "--device", p["device"], "--img-size", str(q["img"]),
           "--batch-size", str(q["batch"]), "--epochs", str(q["epochs"]), "--steps-per-epoch", str(q["steps"]),
           "--train-images", str(q["train_images"]), "--eval-images", str(q["eval_images"]),
           "--workers", str(q["workers"]), "--out", str(out)]
    rc, text = _logged(cmd, rec.path.parent / "convergence.txt")
    results = out / "convergence" / "results.csv"
    if rc or not results.is_file():
        rec("S from scratch", status="failed", rc=rc, tail=text[-1200:])
        return
    cols = read_results(results)
    rec("S from scratch", status="ok", img=q["img"], batch=q["batch"], steps=q["epochs"] * q["steps"],
        minutes=cols["time"][-1] / 60, final_ap=cols["val/AP"][-1], final_ap50=cols["val/AP50"][-1],
        best_ap50=max(cols["val/AP50"]))


SECTIONS = {"tests": section_tests, "cache": section_cache, "train_runs": section_train_runs,
            "throughput": section_throughput, "deploy": section_deploy, "recipe_parity": section_recipe_parity,
            "convergence": section_convergence}


# ----------------------------------------------------------------------------------- the driver
def environment() -> dict:
    import torch
    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
           "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
           "driver": None}
    try:
        env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                       capture_output=True, text=True, timeout=20).stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        pass
    return env


def run_section(name: str, budget: float, dry: bool, work: Path, records: Path) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.gpu_suite", "--section", name, "--work", str(work),
           "--records", str(records)] + (["--dry-run"] if dry else [])
    t0 = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "PYTHONUNBUFFERED": "1"}
    # its own process group, so a section killed at its budget takes its children (data workers, the
    # parity harness's runs) with it instead of leaving them on the GPU beside the next section
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=budget)
        status = "ok" if proc.returncode == 0 else "failed"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log, _ = proc.communicate()
        status = "timed out"
    seconds = time.perf_counter() - t0
    print(f"== {name}: {status} in {seconds:.0f} s (budget {budget:.0f} s)", flush=True)
    return {"status": status, "seconds": seconds, "budget_s": budget, "log_tail": log[-2000:]}


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [f"# GPU suite{' (dry run, CPU)' if report['dry_run'] else ''}: {env['device']}",
             "", f"driver {env['driver']}, torch {env['torch']}, CUDA {env['cuda']}, cuDNN {env['cudnn']}; "
             f"total {report['seconds']:.0f} s", "",
             "| section | record | status | result |", "| --- | --- | --- | --- |"]
    keys = ("samples_per_s", "peak_mem_gib", "teacher_precision", "median_ms", "ratio", "loop_views_per_s",
            "job_views_per_s", "forward_views_per_s",
            "cache_hit_rate", "passed", "failed", "skipped", "loss", "same_init", "ap_inside_band", "final_ap",
            "final_ap_official", "final_ap50", "best_ap50", "minutes", "max_loss_rel", "max_lr_rel", "max_lambda_rel",
            "reloads_same", "max_step_loss_diff", "same_student_distill_diff", "same_student_distill_rel",
            "same_student_target_rel", "reason", "error")
    for name, sec in report["sections"].items():
        recs = [r for r in report["records"] if r["section"] == name]
        if not recs or sec["status"] != "ok":
            lines.append(f"| {name} | (section) | {sec['status']} | {sec['seconds']:.0f} s of {sec['budget_s']:.0f} s |")
        for r in recs:
            result = ", ".join(f"{k} {_fmt(r[k])}" for k in keys if r.get(k) is not None)
            lines.append(f"| {name} | {r['name']} | {r['status']} | {result.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict | None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT"), help="report folder (default: $OUT)")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: the same code paths")
    ap.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=list(SECTIONS))
    ap.add_argument("--budget", nargs="+", default=[], metavar="SECTION=SECONDS",
                    help="override a section's time budget, e.g. --budget deploy=190")
    ap.add_argument("--section", choices=list(SECTIONS), help=argparse.SUPPRESS)   # worker process
    ap.add_argument("--work", help="keep every section's working files here (default: a temporary folder)")
    ap.add_argument("--records", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    if args.section:
        SECTIONS[args.section](plan(args.dry_run), Path(args.work), Records(Path(args.records), args.section))
        return None
    if not args.out:
        ap.error("--out is required when $OUT is not set")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    budgets = dict(DRY_BUDGETS if args.dry_run else BUDGETS)
    for item in args.budget:
        name, _, seconds = item.partition("=")
        if name not in SECTIONS or not seconds.replace(".", "", 1).isdigit():
            ap.error(f"--budget {item}: expected SECTION=SECONDS with SECTION one of {', '.join(SECTIONS)}")
        budgets[name] = float(seconds)
    if not args.dry_run:
        import torch
        if not torch.cuda.is_available():
            ap.error("no CUDA device: run on the GPU machine, or pass --dry-run")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        records = out / "records.jsonl"   # in --out: a suite killed from outside still returns its records
        records.write_text("")
        sections = {name: run_section(name, budgets[name], args.dry_run, work, records)
                    for name in args.sections}
        recs = [json.loads(line) for line in records.read_text().splitlines() if line.strip()]
    report = {"environment": environment(), "dry_run": args.dry_run, "seconds": time.perf_counter() - t0,
              "sections": sections, "records": recs}
    (out / "gpu_suite.json").write_text(json.dumps(report, indent=2, default=str))
    (out / "gpu_suite.md").write_text(markdown(report))
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
