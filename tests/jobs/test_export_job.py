"""ONNX export of every RT-DETRv4 size: interface, onnxruntime-vs-torch parity after postprocessing,
deploy parameter counts, and no DSI projector / teacher in the graph."""
import pytest
import torch

from jobs.export import main
from pipeline.deploy.graph import PARITY_TOL, build_deploy_graph, export_onnx_checked
from pipeline.deploy import onnx_check
from pipeline.deploy.backends import OnnxRuntimeBackend

# Deploy params excl. projector of the official models (reference §1.1, from the released code).
OFFICIAL_DEPLOY_PARAMS_M = {"s": 10.24, "m": 19.25, "l": 30.77, "x": 61.70}


@pytest.mark.parametrize("size", ["s", pytest.param("m", marks=pytest.mark.slow),
                                  pytest.param("l", marks=pytest.mark.slow), pytest.param("x", marks=pytest.mark.slow)])
def test_export_each_size(size, tmp_path):
    image_size = 640 if size == "s" else 320  # 320: other input sizes work too (official #34 crashed)
    built = build_deploy_graph(size)
    info = export_onnx_checked(built, tmp_path / f"{size}.onnx", image_size=image_size, threads=2)
    assert info["graph"]["inputs"] == {"images": ["N", 3, image_size, image_size], "orig_target_sizes": ["N", 2]}
    assert list(info["graph"]["outputs"]) == ["labels", "boxes", "scores"]
    labels, boxes, scores = OnnxRuntimeBackend(info["onnx"]).detections(*onnx_check.random_inputs(3, image_size))
    assert labels.shape == (3, 300) and boxes.shape == (3, 300, 4) and scores.shape == (3, 300)  # dynamic batch
    par = info["parity"]
    assert par["max_abs_diff_boxes"] <= PARITY_TOL and par["max_abs_diff_scores"] <= PARITY_TOL, par
    assert par["label_agreement"] == 1.0 and par["n_compared"] >= 500 and info["parity_ok"]
    assert info["training_only_parts"] == []
    params = sum(p.numel() for p in built.graph.parameters()) / 1e6
    assert round(params, 2) == OFFICIAL_DEPLOY_PARAMS_M[size]


def test_export_job_with_a_dsi_checkpoint(tmp_path, capsys):
    """A training checkpoint that carries the DSI projector (official layout) exports without it."""
    from detector import build_detector
    from detector.checkpoint import save_checkpoint
    from detector.dsi import DSI, DSIConfig

    model = build_detector("s", num_classes=60)
    ckpt = save_checkpoint(model, tmp_path / "s.pth", dsi=DSI(DSIConfig(student_dim=model.cfg.hidden_dim)))
    assert "encoder.feature_projector.0.weight" in torch.load(ckpt, weights_only=False)["model"]

    info = main(["--checkpoint", str(ckpt), "--image-size", "320", "--out", str(tmp_path), "--engine"])  # size detected
    out = capsys.readouterr().out
    assert (tmp_path / "rtdetrv4_s.onnx").is_file() and (tmp_path / "rtdetrv4_s.json").is_file()
    assert "60 classes" in out and "-> OK" in out and "training-only parts in the deploy graph: none" in out
    assert info["training_only_parts"] == []
    assert onnx_check.training_only_parts(info["onnx"], patterns=("encoder.",)) != []  # the check sees names
    if info.get("engine") is None:  # no TensorRT here: the job says what is missing instead of failing
        assert "no TensorRT engine:" in out
    # the checkpoint's weights are the ones exported
    images, sizes = onnx_check.random_inputs(1, 320)
    with torch.no_grad():
        want = model.eval().deploy()(images)["pred_logits"].sigmoid().flatten(1).topk(300).values
    got = OnnxRuntimeBackend(info["onnx"]).detections(images, sizes)[2]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)

    # jobs.predict runs the same checkpoint (size detected) and draws on an image of another size
    from torchvision.io import write_png
    from jobs.predict import main as predict
    write_png((torch.rand(3, 240, 400) * 255).to(torch.uint8), str(tmp_path / "in.png"))
    records = predict(["--checkpoint", str(ckpt), "--input", str(tmp_path / "in.png"), "--image-size", "320",
                       "--score-thr", "0", "--out", str(tmp_path / "pred")])
    dets = records[0]["detections"]
    assert len(dets) == 300 and (tmp_path / "pred" / "in.png").is_file()
    assert all(0 <= d["label"] < 60 for d in dets)
    assert max(d["box_xyxy"][2] for d in dets) > 320  # scaled to the 400x240 original, not the 320 input


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint .*nope.pth not found"):
        build_deploy_graph("s", str(tmp_path / "nope.pth"))
