"""`python -m jobs.benchmark_t4` end to end on CPU without TensorRT: fallback, labels, report files."""
import json
import sys

import pytest
import torch

from jobs.benchmark_t4 import main
from pipeline.deploy import report as rep


@pytest.mark.slow
def test_benchmark_job_falls_back_and_labels_everything(tmp_path, taco_dir, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # as on a machine without TensorRT
    out = tmp_path / "bench"
    # --cpu-bf16 on: the bf16 row whatever this CPU's bf16 support (auto is tested in test_bf16_choice)
    r = main(["--size", "s", "--image-size", "320", "--warmup", "1", "--iters", "2", "--threads", "1", "--cpu-bf16", "on",
              "--images", str(taco_dir / "images"), "--n-images", "2", "--ap", "s=49.8", "--out", str(out)])
    err = capsys.readouterr().err
    assert "TensorRT benchmark not possible: tensorrt is not installed" in err

    saved = json.loads((out / "report.json").read_text())
    rep.validate(saved)
    assert saved["command"].startswith("python -m jobs.benchmark_t4 --size s")
    assert any(u["what"] == "tensorrt" for u in saved["unavailable"])
    assert not saved["comparable_to_paper"] and "NOT a T4" in saved["note"]
    if not torch.cuda.is_available():
        assert {(x["backend"], x["precision"]) for x in saved["results"]} == {
            ("onnxruntime", "fp32"), ("torch", "fp32"), ("torch", "bf16")}
        assert all(x["device"] == f"cpu: {saved['device']['cpu']}" for x in saved["results"])  # CPU model on every row
    assert all(x["batch"] == 1 and x["latency"]["n_iters"] == 2 for x in saved["results"])
    model = saved["models"]["s"]
    assert model["training_only_parts"] == [] and round(model["params"] / 1e6, 2) == 10.24 and model["gflops"] > 0
    par = saved["parity"][0]
    assert par["max_abs_diff_boxes"] <= 1e-3 and par["max_abs_diff_scores"] <= 1e-3
    div = saved["divergence"][0]  # reduced precision vs fp32 on 2 real TACO images
    assert div["reference"].startswith("torch fp32") and div["n_images"] == 2 and div["n_reference"] > 0
    md = (out / "report.md").read_text()
    assert "Not run: tensorrt" in md and "| S | onnxruntime | fp32 |" in md and "Latency ratios" in md
    assert (out / "ap_vs_latency.png").is_file()
    assert r["results"] == saved["results"]


def test_checkpoint_needs_one_size():
    with pytest.raises(SystemExit):
        main(["--size", "s", "l", "--checkpoint", "x.pth"])


def test_cpu_bf16_row_follows_the_rule(monkeypatch):
    """--cpu-bf16 auto asks teacher_cache.bf16; its 'no' is recorded with the reason; on/off force it."""
    from types import SimpleNamespace

    from jobs import benchmark_t4
    from teacher_cache import bf16

    monkeypatch.setattr(bf16, "cpu_flags", lambda: frozenset({"avx2"}))
    monkeypatch.setattr("torch.backends.cpu.get_cpu_capability", lambda: "AVX2")
    calls = []
    fake = SimpleNamespace(prepare=lambda *a: a, infer=lambda *a: calls.append(1))
    args = SimpleNamespace(cpu_bf16="auto", batch=1, image_size=32)
    report = {"unavailable": []}
    assert not benchmark_t4.cpu_bf16_row(args, fake, fake, report)
    assert calls == [] and report["unavailable"][0]["what"] == "torch bf16 cpu"
    assert "no native bf16" in report["unavailable"][0]["reason"]
    assert benchmark_t4.cpu_bf16_row(SimpleNamespace(cpu_bf16="on"), fake, fake, report)
    assert not benchmark_t4.cpu_bf16_row(SimpleNamespace(cpu_bf16="off"), fake, fake, report)
