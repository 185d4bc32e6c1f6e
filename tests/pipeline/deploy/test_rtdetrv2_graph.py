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
