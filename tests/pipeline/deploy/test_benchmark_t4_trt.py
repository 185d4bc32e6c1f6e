"""TensorRT path: availability message, cache key, and (GPU + tensorrt only) a real engine build and run."""
import sys

import pytest
import torch

from pipeline.deploy import onnx_check
from pipeline.deploy.compare import compare_detections
from pipeline.deploy.trt_engine import cache_key, image_profile, tensorrt_status


@pytest.fixture
def no_tensorrt(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # makes `import tensorrt` raise ImportError


def test_status_names_what_is_missing(no_tensorrt):
    ok, why = tensorrt_status()
    assert not ok
    assert "tensorrt is not installed" in why and "pypi.nvidia.com" in why


def test_job_without_tensorrt_says_so_and_falls_back(no_tensorrt, capsys):
    from jobs.benchmark_t4 import availability
    ok, missing = availability("tensorrt")
    err = capsys.readouterr().err
    assert not ok
    assert "TensorRT benchmark not possible: tensorrt is not installed" in err
    assert "Falling back to onnxruntime and torch" in err
    assert any(m["what"] == "tensorrt" for m in missing)
    if not torch.cuda.is_available():
        assert any(m["what"] == "cuda" for m in missing)


def test_predict_engine_without_tensorrt_is_a_clear_error(no_tensorrt, tmp_path):
    from jobs.predict import main
    (tmp_path / "x.jpg").write_bytes(b"")
    with pytest.raises(ValueError, match="--engine .*m.engine: cannot run it .*tensorrt is not installed"):
        main(["--engine", str(tmp_path / "m.engine"), "--input", str(tmp_path / "x.jpg"), "--out", str(tmp_path)])


def test_cache_key_changes_with_everything_that_changes_the_engine():
    spec = image_profile(640, max_batch=32, fp16=True)
    base = cache_key(b"onnx", spec, "10.6.0", "Tesla T4")
    assert base == cache_key(b"onnx", image_profile(640, max_batch=32, fp16=True), "10.6.0", "Tesla T4")
    others = [cache_key(b"onnx2", spec, "10.6.0", "Tesla T4"),
              cache_key(b"onnx", image_profile(640, max_batch=32, fp16=False), "10.6.0", "Tesla T4"),
              cache_key(b"onnx", image_profile(640, max_batch=16, fp16=True), "10.6.0", "Tesla T4"),
              cache_key(b"onnx", image_profile(512, max_batch=32, fp16=True), "10.6.0", "Tesla T4"),
              cache_key(b"onnx", image_profile(640, max_batch=32, fp16=True, tf32=False), "10.6.0", "Tesla T4"),
              cache_key(b"onnx", spec, "10.7.0", "Tesla T4"),
              cache_key(b"onnx", spec, "10.6.0", "NVIDIA A10")]
    assert len({base, *others}) == 8


def test_profile_shapes():
    spec = image_profile(640, min_batch=1, opt_batch=1, max_batch=8)
    assert spec.min_shapes["images"] == (1, 3, 640, 640) and spec.max_shapes["orig_target_sizes"] == (8, 2)
    assert spec.precision == "fp16" and image_profile(fp16=False).precision == "fp32"


@pytest.mark.gpu
def test_tensorrt_engine_matches_onnxruntime(tmp_path):
    ok, why = tensorrt_status()
    if not ok:
        pytest.skip(why)
    from tiny_onnx import export_tiny
    from pipeline.deploy.backends import OnnxRuntimeBackend, TensorRTBackend
    from pipeline.deploy.latency import measure
    from pipeline.deploy.trt_engine import build_engine

    onnx_path = tmp_path / "tiny.onnx"
    export_tiny(onnx_path)
    spec = image_profile(64, max_batch=4, fp16=False)
    engine = build_engine(onnx_path, spec, cache_dir=tmp_path / "engines")
    assert build_engine(onnx_path, spec, cache_dir=tmp_path / "engines") == engine  # cache hit
    trt_b, ort_b = TensorRTBackend(engine, "fp32"), OnnxRuntimeBackend(onnx_path, threads=1)
    for batch in (1, 3):
        images, sizes = onnx_check.random_inputs(batch, 64, seed=batch, orig_size=(640, 480))
        p = compare_detections(ort_b.detections(images, sizes), trt_b.detections(images, sizes), mode="parity")
        assert p.max_abs_diff_boxes <= 1e-2 and p.max_abs_diff_scores <= 1e-3
    feeds = trt_b.prepare(*onnx_check.random_inputs(1, 64))
    assert measure(lambda: trt_b.infer(*feeds), 2, 5, cuda=True).timer == "cuda-events"
