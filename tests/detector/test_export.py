"""ONNX export of the deploy graph (RT-DETRv4-S, small input) checked in onnxruntime."""
import numpy as np
import pytest
import torch

from detector.deploy import DeployModel, detection_differences, export_onnx
from detector.postprocessor import PostProcessor
from test_detector_parity import seeded_detector

SIZE = 160  # smallest square input with >= 300 anchors (20^2 + 10^2 + 5^2)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = seeded_detector("s").float()   # float64-calibrated parity weights, exported in float32
    path = tmp_path_factory.mktemp("onnx") / "rtdetrv4_s.onnx"
    report = export_onnx(model, PostProcessor(num_classes=80), path, size=SIZE)
    return model, report


def test_export_matches_torch_deploy_graph(exported):
    model, report = exported
    assert report.path.is_file() and report.opset == 17
    assert report.max_abs_diff["labels"] == 0
    assert report.max_abs_diff["scores"] <= 1e-4 and report.max_abs_diff["boxes"] <= 1e-4 * 2 * SIZE
    assert not getattr(model, "deployed", False)  # the caller's model is not converted


def test_onnx_interface_and_dynamic_batch(exported):
    import onnxruntime as ort
    model, report = exported
    sess = ort.InferenceSession(str(report.path), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["images", "orig_target_sizes"]
    assert [o.name for o in sess.get_outputs()] == ["labels", "boxes", "scores"]
    g = torch.Generator().manual_seed(3)
    images = torch.rand(3, 3, SIZE, SIZE, generator=g)
    sizes = torch.tensor([[640, 480], [SIZE, SIZE], [1000, 750]], dtype=torch.int64)
    labels, boxes, scores = sess.run(None, {"images": images.numpy(), "orig_target_sizes": sizes.numpy()})
    assert labels.shape == (3, 300) and labels.dtype == np.int64 and boxes.shape == (3, 300, 4)
    with torch.no_grad():
        want = DeployModel(model, PostProcessor(num_classes=80))(images, sizes)
    # the eval (non-deploy) model, post-processed, gives the same detections
    with torch.no_grad():
        eval_det = PostProcessor(num_classes=80)(model(images), sizes)
    diff = detection_differences([torch.from_numpy(a) for a in (labels, boxes, scores)], want)
    assert diff["labels"] == 0 and diff["scores"] <= 1e-4 and diff["boxes"] <= 1e-4 * 1000, diff
    eval_tensors = [torch.stack([d[k] for d in eval_det]) for k in ("labels", "boxes", "scores")]
    diff = detection_differences(eval_tensors, want)
    assert diff["labels"] == 0 and diff["scores"] <= 1e-4 and diff["boxes"] <= 1e-4 * 1000, diff


def test_detection_differences_catches_a_wrong_box():
    labels = torch.tensor([[1, 2, 2]])
    boxes = torch.tensor([[[0.0, 0, 10, 10], [5, 5, 20, 20], [1, 1, 2, 2]]])
    scores = torch.tensor([[0.9, 0.5, 0.5]])
    swapped = [labels, boxes[:, [0, 2, 1]], scores]  # tie: order of the two 0.5 detections is free
    assert detection_differences(swapped, [labels, boxes, scores]) == {"labels": 0, "boxes": 0.0, "scores": 0.0}
    moved = boxes.clone()
    moved[0, 0, 0] = 3
    assert detection_differences([labels, moved, scores], [labels, boxes, scores])["boxes"] == 3


def test_export_rejects_bad_size(tmp_path):
    with pytest.raises(ValueError, match="multiple of 32"):
        export_onnx(torch.nn.Identity(), PostProcessor(), tmp_path / "x.onnx", size=100)


def _declared_shapes(path):
    import onnx
    proto = onnx.shape_inference.infer_shapes(onnx.load(str(path)), strict_mode=True)
    return {o.name: [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim] for o in proto.graph.output}


def test_declared_output_shapes_dynamic_batch(exported):
    _, report = exported
    assert _declared_shapes(report.path) == {"labels": ["N", 300], "boxes": ["N", 300, 4], "scores": ["N", 300]}


def test_declared_output_shapes_batch1(tmp_path):
    import onnxruntime as ort
    path = tmp_path / "rtdetrv4_s_b1.onnx"
    report = export_onnx(seeded_detector("s").float(), PostProcessor(num_classes=80, num_top_queries=100), path,
                         size=SIZE, dynamic_batch=False)
    assert report.max_abs_diff["labels"] == 0 and report.max_abs_diff["scores"] <= 1e-4
    assert _declared_shapes(path) == {"labels": [1, 100], "boxes": [1, 100, 4], "scores": [1, 100]}
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [o.shape for o in sess.get_outputs()] == [[1, 100], [1, 100, 4], [1, 100]]
    assert sess.get_inputs()[0].shape == [1, 3, SIZE, SIZE]
