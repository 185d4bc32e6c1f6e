"""Deploy-path tests on a tiny real detector (conv net + top-k postprocessor), independent of RT-DETRv4.

`TinyDeployNet` has the deploy interface of the real graph (images, orig_target_sizes) ->
(labels, boxes, scores) and a training-only `feature_projector`, so the ONNX checks, onnxruntime
parity, divergence check, timing and report code are exercised end to end in a second.
"""
import json

import numpy as np
import pytest
import torch

from pipeline.deploy import onnx_check, report
from pipeline.deploy.backends import OnnxRuntimeBackend, TorchBackend
from pipeline.deploy.compare import compare_detections
from pipeline.deploy.latency import LatencyStats, busy_warning, device_info, measure, measure_interleaved
from tiny_onnx import TinyDeployNet, export_tiny


@pytest.fixture
def tiny(tmp_path):
    path = tmp_path / "tiny.onnx"
    return export_tiny(path), path


def test_interface_and_no_training_parts(tiny):
    net, path = tiny
    s = onnx_check.check_interface(path)
    assert s["inputs"]["images"][0] == "N" and s["inputs"]["images"][1:] == [3, 64, 64]
    assert "TopK" in s["op_types"]  # postprocessing is inside the graph
    assert onnx_check.training_only_parts(path) == []
    assert onnx_check.training_only_parts(path, patterns=("body",)) != []  # the check can fire


def test_check_interface_rejects_fixed_batch(tmp_path):
    net = TinyDeployNet().eval()
    torch.onnx.export(net, onnx_check.random_inputs(1, 64), str(tmp_path / "fixed.onnx"),
                      input_names=["images", "orig_target_sizes"], output_names=["labels", "boxes", "scores"],
                      opset_version=17, dynamo=False)
    with pytest.raises(ValueError, match="dynamic_batch"):
        onnx_check.check_interface(tmp_path / "fixed.onnx")


def test_onnxruntime_matches_torch_any_batch(tiny):
    net, path = tiny
    ort_b, torch_b = OnnxRuntimeBackend(path, threads=1), TorchBackend(net)
    for batch in (1, 3):  # dynamic batch
        images, sizes = onnx_check.random_inputs(batch, 64, seed=batch, orig_size=(500, 375))
        p = compare_detections(torch_b.detections(images, sizes), ort_b.detections(images, sizes), mode="parity")
        assert p.max_abs_diff_boxes <= 1e-3 and p.max_abs_diff_scores <= 1e-3
        assert p.label_agreement == 1.0 and p.n_compared > 0


def test_parity_detects_a_wrong_graph(tiny):
    net, path = tiny
    images, sizes = onnx_check.random_inputs(1, 64)
    ref = TorchBackend(net).detections(images, sizes)
    wrong = (ref[0], ref[1] * 1.01, ref[2])
    assert compare_detections(ref, wrong, mode="parity").max_abs_diff_boxes > 1e-3


def test_bf16_vs_fp32_divergence_on_tiny_net(tiny):
    net, _ = tiny
    images, sizes = onnx_check.random_inputs(2, 64, orig_size=(640, 640))
    fp32 = TorchBackend(net).detections(images, sizes)
    bf16 = TorchBackend(net, precision="bf16").detections(images, sizes)
    d = compare_detections(fp32, bf16, "torch fp32", "torch bf16", top_k=10)
    assert d.n_reference == 20 and 0.0 <= d.recall <= 1.0
    same = compare_detections(fp32, fp32, "torch fp32", "torch fp32", top_k=10)
    assert same.recall == 1.0 and same.mean_box_shift_px == 0.0 and not same.diverged


def test_timing_and_report_roundtrip(tiny, tmp_path):
    net, path = tiny
    b = OnnxRuntimeBackend(path, threads=1)
    args = b.prepare(*onnx_check.random_inputs(1, 64))
    stats = measure(lambda: b.infer(*args), n_warmup=2, n_iters=5)
    assert stats.n_iters == 5 and stats.min_ms <= stats.median_ms <= stats.p90_ms and stats.fps > 0
    rep = report.new_report("pytest", device_info(cuda=False), {"torch": torch.__version__},
                            [{"what": "tensorrt", "reason": "not installed"}])
    rep["results"].append({"size": "s", "backend": b.name, "precision": b.precision, "device": "cpu",
                           "label": b.label, "batch": 1, "image_size": 64, "latency": stats.to_dict()})
    out = report.write_json(rep, tmp_path / "r.json")
    back = json.loads(out.read_text())
    assert back["comparable_to_paper"] is False and "NOT a T4" in back["note"]
    md = report.to_markdown(back)
    assert "| S | onnxruntime | fp32 | cpu | 1 | 64 |" in md
    assert "Not run: tensorrt" in md


def test_latency_stats():
    s = LatencyStats.from_samples([1, 2, 3, 4, 10], n_warmup=0, batch=2, timer="t")
    assert s.mean_ms == 4 and s.median_ms == 3 and s.min_ms == 1 and np.isclose(s.fps, 500)
    assert np.isclose(s.p90_ms, np.percentile([1, 2, 3, 4, 10], 90))
    with pytest.raises(ValueError):
        LatencyStats.from_samples([], 0, 1, "t")


def test_interleaved_timing_calls_each_backend_in_turn():
    calls = []
    stats = measure_interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, n_warmup=1, n_iters=3)
    assert calls == ["a", "b"] + ["a", "b"] * 3  # warm-up of each, then round-robin
    assert stats["a"].n_iters == 3 and stats["b"].timer == "perf_counter, round-robin"


def test_device_info_and_busy_warning():
    info = device_info(cuda=False)
    assert info["cpu"] and info["name"] == info["cpu"] and info["is_t4"] is False
    assert "CPU busy" in busy_warning({"load_avg_1m": 9.0, "cpu_threads_available": 2})
    assert busy_warning({"load_avg_1m": 0.5, "cpu_threads_available": 2}) is None
