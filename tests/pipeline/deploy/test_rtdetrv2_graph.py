"""The RT-CO-DETR student's deploy graph (our postprocessor inside) and the benchmark's selection."""
import pytest
import torch

pytest.importorskip("transformers")

from tiny_rtdetrv2 import tiny_student  # noqa: E402

from pipeline.deploy.graph import build_rtdetrv2_graph  # noqa: E402


def test_graph_from_a_local_directory_reads_its_class_count(tmp_path):
    tiny_student(num_classes=7).model.save_pretrained(tmp_path)
    built = build_rtdetrv2_graph(str(tmp_path))
    assert (built.size, built.num_classes, built.source) == ("rtdetrv2_r50", 7, str(tmp_path))
    with torch.no_grad():
        labels, boxes, scores = built.graph(torch.rand(2, 3, 64, 64), torch.tensor([[64, 64], [128, 64]]))
    assert boxes.shape == (2, 140, 4)                       # top 20 queries x 7 classes
    assert int(labels.max()) < 7 and float(scores.max()) <= 1.0
    assert float(boxes[1, :, 0::2].max()) <= 128.0 + 1e-3     # scaled to each image's original size


def test_benchmark_flag_selects_the_student():
    from jobs.benchmark_t4 import parse_args
    args = parse_args(["--student", "rtdetrv2_r50", "--backend", "onnxruntime"])
    assert args.sizes == ["rtdetrv2_r50"]


def test_onnx_export_matches_torch_once_batchnorm_is_calibrated(tmp_path):
    """Uncalibrated random BN statistics saturate the encoder scores (tied top-k: 500+ px apart between
    onnxruntime and torch); with calibrated statistics the same export agrees to 1e-3 px."""
    from detector.deploy import DeployModel
    from detector.postprocessor import PostProcessor
    from pipeline.deploy.graph import Built, calibrate_batchnorm, export_onnx_checked
    student = tiny_student(num_classes=7)
    calibrate_batchnorm(student.model)
    graph = DeployModel(student.deploy(), PostProcessor(num_classes=7, num_top_queries=140)).eval()
    info = export_onnx_checked(Built(graph, "rtdetrv2_r50", 7, "random weights"), tmp_path / "v2.onnx",
                               image_size=128, threads=1)
    assert info["parity_ok"], info["parity"]
    assert info["parity"]["n_compared"] > 100 and info["training_only_parts"] == []
