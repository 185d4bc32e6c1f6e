"""The model warns once per process on float images outside [0, 1] (0-255 floats, normalised inputs),
reading the range of a model's first batch only: later forwards make no host sync, so inference can
be captured in a CUDA graph and compiled without a graph break."""
import warnings

import pytest
import torch

import detector.model as model_mod
from detector import build_detector
from pipeline.train.host_sync import count_host_syncs


def _model():
    return build_detector("s", num_classes=2, num_queries=10).eval()


def test_warns_once_on_images_outside_unit_range(monkeypatch):
    monkeypatch.setattr(model_mod, "_warned_range", False)
    image = torch.rand(1, 3, 64, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad():
            _model()(image)                       # in range: silent
    with pytest.warns(UserWarning, match=r"outside the \[0, 1\].*divide 0-255 images by 255"):
        with torch.no_grad():
            _model()(image * 255)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad():
            _model()(image * 255)                 # once per process


def test_range_is_read_on_the_first_batch_only():
    model, image = _model(), torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        with count_host_syncs(model, image) as first:
            model(image)
        with count_host_syncs(model, image) as later:
            model(image)
    assert first.total == 2 and all("model.py" in k for k in first.where), first   # min and max
    assert later.total == 0, later


def test_deploy_graph_traces_without_graph_breaks():
    """torch.compile's tracer takes the whole deploy forward as one graph (what broke compile and
    CUDA-graph capture on the H200: the range check's host sync on every call)."""
    from detector.deploy import DeployModel
    from detector.postprocessor import PostProcessor
    model = build_detector("s", num_classes=2, num_queries=10, eval_spatial_size=(64, 64)).deploy()
    graph = DeployModel(model, PostProcessor(num_classes=2, num_top_queries=10).deploy())
    image, sizes = torch.rand(1, 3, 64, 64), torch.tensor([[64, 64]])
    with torch.no_grad():
        want = graph(image, sizes)
        torch._dynamo.reset()
        got = torch.compile(graph, backend="eager", fullgraph=True)(image, sizes)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
