"""Benchmark report: one JSON document, a Markdown rendering, and an AP-vs-latency plot.

Every number carries the backend, precision and device it was measured with; a report from any
device other than a T4 running TensorRT FP16 says so at the top, because the paper's latencies
(3.66 / 5.91 / 8.07 / 12.90 ms for S/M/L/X) are T4 TensorRT FP16 batch 1.
"""
from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

SCHEMA = "rtdetrv4-benchmark/1"

# Published numbers (T4, TensorRT FP16, batch 1, 640): RT-DETRv4 README, and the peers of Figure 1.
PAPER_T4_MS = {"s": 3.66, "m": 5.91, "l": 8.07, "x": 12.90}
PAPER_AP = {"s": 49.8, "m": 53.7, "l": 55.4, "x": 57.0}
PUBLISHED = {  # name: [(size, AP, latency ms)]; FPS converted as 1000 / FPS
    "RT-DETRv4": [(k, PAPER_AP[k], PAPER_T4_MS[k]) for k in "smlx"],
    "D-FINE": [("s", 48.5, 1000 / 287), ("m", 52.3, 1000 / 180), ("l", 54.0, 1000 / 129), ("x", 55.8, 1000 / 81)],
    "DEIM-D-FINE": [("l", 54.7, 1000 / 124), ("x", 56.5, 1000 / 78)],
    "RT-DETRv2": [("s", 48.1, 1000 / 217), ("m", 51.9, 1000 / 145), ("l", 53.4, 1000 / 108), ("x", 54.3, 1000 / 74)],
}

REQUIRED = {"schema": str, "created_utc": str, "command": str, "device": dict, "software": dict,
            "unavailable": list, "comparable_to_paper": bool, "note": str, "paper": dict,
            "models": dict, "parity": list, "divergence": list, "results": list, "warnings": list}
RESULT_REQUIRED = {"size": str, "backend": str, "precision": str, "device": str, "label": str,
                   "batch": int, "image_size": int, "latency": dict}
LATENCY_REQUIRED = ("mean_ms", "median_ms", "p90_ms", "fps", "n_iters", "n_warmup")


def new_report(command: str, device: dict, software: dict, unavailable: list[dict]) -> dict:
    """An empty report; `comparable_to_paper` is True only on a T4 with TensorRT present."""
    t4 = bool(device.get("is_t4")) and not any(u["what"] == "tensorrt" for u in unavailable)
    if t4:
        note = f"Measured on {device['name']}, comparable with the paper's T4 TensorRT FP16 numbers."
    else:
        note = (f"Measured on {device['name']}, NOT a T4 with TensorRT FP16: these latencies are not "
                f"comparable with the paper's ({', '.join(f'{k.upper()} {v} ms' for k, v in PAPER_T4_MS.items())}); "
                f"compare ratios between backends measured here.")
    return {"schema": SCHEMA, "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": command, "device": device, "software": software, "unavailable": unavailable,
            "comparable_to_paper": t4, "note": note,
            "paper": {"device": "NVIDIA T4", "backend": "tensorrt", "precision": "fp16", "batch": 1,
                      "image_size": 640, "latency_ms": PAPER_T4_MS, "coco_ap": PAPER_AP},
            "models": {}, "parity": [], "divergence": [], "results": [], "warnings": []}


def validate(report: dict) -> None:
    """Raise ValueError naming the first key that is missing or of the wrong type."""
    def check(d, spec, where):
        for k, t in spec.items():
            if k not in d:
                raise ValueError(f"{where}: missing key {k!r}")
            if not isinstance(d[k], t):
                raise ValueError(f"{where}: {k!r} should be {t.__name__}, got {type(d[k]).__name__}")
    check(report, REQUIRED, "report")
    if report["schema"] != SCHEMA:
        raise ValueError(f"report: schema {report['schema']!r} is not {SCHEMA!r}")
    for i, r in enumerate(report["results"]):
        check(r, RESULT_REQUIRED, f"results[{i}]")
        for k in LATENCY_REQUIRED:
            if k not in r["latency"]:
                raise ValueError(f"results[{i}].latency: missing key {k!r}")


def write_json(report: dict, path: str | Path) -> Path:
    validate(report)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path


def _fmt(x, spec=".2f"):
    return "-" if x is None else format(x, spec)


def to_markdown(report: dict) -> str:
    """Latency table (plus ratios, parity, FP16 divergence), headed by the device and its caveat."""
    validate(report)
    lines = [f"# RT-DETRv4 deploy benchmark on {report['device']['name']}", "",
             f"`{report['command']}`  ({report['created_utc']})", "", f"> {report['note']}"]
    for u in report["unavailable"]:
        lines.append(f"> Not run: {u['what']}: {u['reason']}")
    lines += ["", "| size | backend | precision | device | batch | input | mean ms | median ms | p90 ms | FPS "
              "| params (M) | GFLOPs | paper T4 TRT-FP16 ms |", "|" + "---|" * 13]
    for r in report["results"]:
        m = report["models"].get(r["size"], {})
        lat = r["latency"]
        lines.append(f"| {r['size'].upper()} | {r['backend']} | {r['precision']} | {r['device']} | {r['batch']} | {r['image_size']} "
                     f"| {lat['mean_ms']:.2f} | {lat['median_ms']:.2f} | {lat['p90_ms']:.2f} | {lat['fps']:.1f} "
                     f"| {_fmt(m.get('params') and m['params'] / 1e6)} | {_fmt(m.get('gflops'))} "
                     f"| {PAPER_T4_MS.get(r['size'], '-')} |")
    ratios = ratio_rows(report["results"])
    if ratios:
        lines += ["", "Latency ratios within this run (mean / mean of the first backend of each size):", "",
                  "| size | backend | vs | ratio |", "|---|---|---|---|"]
        lines += [f"| {s.upper()} | {a} | {b} | {x:.2f}x |" for s, a, b, x in ratios]
    if report["models"]:
        lines += ["", "| size | params | GFLOPs | training-only parts in deploy graph |", "|---|---|---|---|"]
        for s, m in report["models"].items():
            parts = m.get("training_only_parts")
            lines.append(f"| {s.upper()} | {m.get('params', '-'):,} | {_fmt(m.get('gflops'))} "
                         f"| {'none' if parts == [] else parts} |")
    if report["parity"]:
        lines += ["", "| size | reference | candidate | max abs diff boxes | max abs diff scores | labels agree |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {p['size'].upper()} | {p['reference']} | {p['candidate']} | {p['max_abs_diff_boxes']:.2e} "
                  f"| {p['max_abs_diff_scores']:.2e} | {p['label_agreement']:.3f} |" for p in report["parity"]]
    if report["divergence"]:
        lines += ["", "Reduced vs full precision on real images:", "",
                  "| size | reference | candidate | selection | recall | labels agree | mean IoU | box shift px | diverged |",
                  "|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {d['size'].upper()} | {d['reference']} | {d['candidate']} | {d['selection']}"
                  f"{' (random weights: indicative only)' if d.get('note') else ''} | {d['recall']:.3f} "
                  f"| {d['label_agreement']:.3f} | {d['mean_iou']:.3f} | {d['mean_box_shift_px']:.2f} "
                  f"| {'YES: ' + '; '.join(d['reasons']) if d['diverged'] else 'no'} |" for d in report["divergence"]]
    if report["warnings"]:
        lines += ["", "Warnings:", ""] + [f"- {w}" for w in report["warnings"]]
    return "\n".join(lines) + "\n"


def ratio_rows(results: list[dict]) -> list[tuple[str, str, str, float]]:
    """(size, label, reference label, mean ratio) for every non-first backend of each size."""
    first: dict[tuple, dict] = {}
    rows = []
    for r in results:
        key = (r["size"], r["batch"])
        if key not in first:
            first[key] = r
            continue
        ref = first[key]
        rows.append((r["size"], r["label"], ref["label"], r["latency"]["mean_ms"] / ref["latency"]["mean_ms"]))
    return rows


def plot_ap_latency(report: dict, ap: dict[str, float], path: str | Path) -> Path:
    """AP vs latency in the style of the paper's Figure 1 (published T4 curves), plus our measured points.

    Measured points from any device other than a T4 TensorRT go in a second panel, so they are never
    drawn on the published T4 axis.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_backend: dict[str, list] = {}
    for r in report["results"]:
        if r["size"] in ap and r["batch"] == 1:
            by_backend.setdefault(r["label"], []).append((r["size"], ap[r["size"]], r["latency"]["mean_ms"]))
    same_axis = report["comparable_to_paper"]
    fig, axes = plt.subplots(1, 1 if same_axis else 2, figsize=(7 if same_axis else 13, 5), squeeze=False)
    ax = axes[0, 0]
    for name, pts in PUBLISHED.items():
        _curve(ax, name + " (published)", pts, bold=name == "RT-DETRv4")
    ax.set_title("Published: NVIDIA T4, TensorRT FP16, batch 1")
    target = ax if same_axis else axes[0, 1]
    for label, pts in by_backend.items():
        _curve(target, f"ours: {label}", sorted(pts, key=lambda p: p[2]), bold=True)
    if not same_axis:
        target.set_title(f"Measured here: {report['device']['name']} (not comparable with T4)")
    for a in axes.flat:
        a.set_xlabel("Latency (ms)")
        a.set_ylabel("COCO AP (%)")
        a.grid(True, alpha=0.3)
        if a.lines:
            a.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _curve(ax, name, pts, bold=False):
    xs, ys = [p[2] for p in pts], [p[1] for p in pts]
    ax.plot(xs, ys, marker="*" if bold else "o", markersize=10 if bold else 5,
            linewidth=2.2 if bold else 1.2, label=name)
    for s, y, x in pts:
        ax.annotate(s.upper(), (x, y), textcoords="offset points", xytext=(4, -10), fontsize=7)


def load_ap(spec: str | None) -> dict[str, float]:
    """COCO AP per size from "s=49.8,l=55.4" or a JSON file {"s": 49.8, ...} (AP in %, or 0-1 fractions)."""
    if not spec:
        return {}
    p = Path(spec)
    if p.suffix == ".json" or p.is_file():
        if not p.is_file():
            raise FileNotFoundError(f"AP file {p} not found; pass --ap s=49.8,l=55.4 or a JSON file {{'s': 49.8}}")
        raw = json.loads(p.read_text())
    else:
        try:
            raw = dict((k.strip().lower(), float(v)) for k, v in (x.split("=") for x in spec.split(",")))
        except ValueError:
            raise ValueError(f"--ap {spec!r}: expected size=AP pairs like s=49.8,l=55.4 or a JSON file") from None
    out = {}
    for k, v in raw.items():
        if k not in PAPER_T4_MS:
            raise ValueError(f"--ap: unknown size {k!r} (sizes are s, m, l, x)")
        v = float(v)
        out[k] = v * 100 if v <= 1.0 else v
    return out
