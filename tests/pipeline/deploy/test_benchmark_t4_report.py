"""Report schema, Markdown, AP-vs-latency plot, AP parsing, and the fp16 divergence check."""
import json

import pytest
import torch

from pipeline.deploy import report
from pipeline.deploy.compare import compare_detections
from pipeline.deploy.latency import LatencyStats


def _row(size, backend, precision, mean, device="cpu"):
    lat = LatencyStats.from_samples([mean] * 4, 1, 1, "perf_counter").to_dict()
    return {"size": size, "backend": backend, "precision": precision, "device": device,
            "label": f"{backend} {precision} {device}", "batch": 1, "image_size": 640, "latency": lat}


def _report(device=None, unavailable=None):
    device = device or {"name": "Intel(R) Xeon(R)", "cpu": "Intel(R) Xeon(R)", "gpu": None, "is_t4": False}
    r = report.new_report("python -m jobs.benchmark_t4 --size s", device, {"torch": "x"},
                          [{"what": "tensorrt", "reason": "tensorrt is not installed"}] if unavailable is None else unavailable)
    r["results"] += [_row("s", "onnxruntime", "fp32", 100.0), _row("s", "torch", "fp32", 150.0),
                     _row("l", "onnxruntime", "fp32", 400.0)]
    r["models"]["s"] = {"params": 10_240_000, "gflops": 25.1, "training_only_parts": []}
    return r


def test_schema_roundtrip(tmp_path):
    r = _report()
    path = report.write_json(r, tmp_path / "report.json")
    back = json.loads(path.read_text())
    report.validate(back)
    assert back["schema"] == report.SCHEMA and back["paper"]["latency_ms"]["l"] == 8.07
    assert back["comparable_to_paper"] is False


@pytest.mark.parametrize("breaks", [lambda r: r.pop("device"), lambda r: r.update(results="x"),
                                    lambda r: r["results"][0].pop("precision"),
                                    lambda r: r["results"][0]["latency"].pop("p90_ms"),
                                    lambda r: r.update(schema="other/1")])
def test_schema_rejects_broken_reports(breaks):
    r = _report()
    breaks(r)
    with pytest.raises(ValueError):
        report.validate(r)


def test_only_t4_with_tensorrt_is_comparable():
    t4 = {"name": "Tesla T4", "cpu": "x", "gpu": "Tesla T4", "is_t4": True}
    assert report.new_report("c", t4, {}, [])["comparable_to_paper"]
    assert not report.new_report("c", t4, {}, [{"what": "tensorrt", "reason": "missing"}])["comparable_to_paper"]
    h100 = {"name": "NVIDIA H100", "cpu": "x", "gpu": "NVIDIA H100", "is_t4": False}
    r = report.new_report("c", h100, {}, [])
    assert not r["comparable_to_paper"] and "NOT a T4" in r["note"] and "NVIDIA H100" in r["note"]


def test_markdown_names_device_caveat_and_ratios():
    md = report.to_markdown(_report())
    assert md.startswith("# RT-DETRv4 deploy benchmark on Intel(R) Xeon(R)")
    assert "NOT a T4" in md and "Not run: tensorrt: tensorrt is not installed" in md
    assert "| S | onnxruntime | fp32 | cpu | 1 | 640 | 100.00 |" in md and "| 8.07 |" in md
    assert "| S | torch fp32 cpu | onnxruntime fp32 cpu | 1.50x |" in md
    assert "| S | 10,240,000 | 25.10 | none |" in md


def test_ratio_rows():
    rows = report.ratio_rows(_report()["results"])
    assert rows == [("s", "torch fp32 cpu", "onnxruntime fp32 cpu", 1.5)]


def test_plot_writes_png(tmp_path):
    out = report.plot_ap_latency(_report(), {"s": 49.8, "l": 55.4}, tmp_path / "ap.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_load_ap(tmp_path):
    assert report.load_ap("s=49.8,L=55.4") == {"s": 49.8, "l": 55.4}
    (tmp_path / "ap.json").write_text(json.dumps({"m": 0.537}))
    assert report.load_ap(str(tmp_path / "ap.json")) == pytest.approx({"m": 53.7})
    assert report.load_ap(None) == {}
    with pytest.raises(ValueError, match="unknown size"):
        report.load_ap("q=3")
    with pytest.raises(FileNotFoundError):
        report.load_ap(str(tmp_path / "missing.json"))


def _dets(boxes, labels, scores):
    return (torch.tensor([labels]), torch.tensor([boxes], dtype=torch.float32), torch.tensor([scores]))


def test_divergence_identical_reordered_and_shifted():
    boxes = [[0, 0, 10, 10], [20, 20, 60, 60], [100, 100, 150, 140]]
    ref = _dets(boxes, [1, 2, 3], [0.9, 0.8, 0.7])
    reordered = _dets(boxes[::-1], [3, 2, 1], [0.7, 0.8, 0.9])
    d = compare_detections(ref, reordered, "fp32", "fp16")
    assert d.recall == 1 and d.label_agreement == 1 and d.mean_iou == 1 and not d.diverged
    shifted = _dets([[b[0] + 1, b[1], b[2] + 1, b[3]] for b in boxes], [1, 2, 3], [0.85, 0.8, 0.7])
    d = compare_detections(ref, shifted, "fp32", "fp16")
    assert d.mean_box_shift_px == pytest.approx(0.5) and d.max_score_diff == pytest.approx(0.05, abs=1e-6)
    assert not d.diverged


def test_divergence_flags_lost_detections_and_zero_labels():
    boxes = [[0, 0, 10, 10], [20, 20, 60, 60], [100, 100, 150, 140], [200, 200, 260, 260]]
    ref = _dets(boxes, [1, 2, 3, 4], [0.9, 0.8, 0.7, 0.6])
    half = _dets(boxes, [1, 2, 3, 4], [0.9, 0.8, 0.1, 0.1])  # two fall under the threshold
    d = compare_detections(ref, half, "trt fp32", "trt fp16")
    assert d.recall == 0.5 and d.diverged and "only 50%" in d.reasons[0]
    zeros = _dets(boxes, [0, 0, 0, 0], [0.9, 0.8, 0.7, 0.6])  # the D-FINE #44 symptom
    d = compare_detections(ref, zeros, "trt fp32", "trt fp16")
    assert d.recall == 1 and d.label_agreement == 0 and d.diverged
    assert "DIVERGED" in d.summary()
