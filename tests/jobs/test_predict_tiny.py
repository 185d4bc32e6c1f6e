"""jobs.predict and its parts (inputs, drawing, names) on a tiny ONNX detector and real TACO images."""
import json

import pytest
import torch

from jobs.predict import load_names, main
from pipeline.deploy.inputs import list_images, read_image, to_inputs, video_frames
from pipeline.deploy.draw import draw_detections
from tiny_onnx import export_tiny


def test_draw_marks_only_confident_boxes():
    image = torch.zeros(3, 100, 120, dtype=torch.uint8)
    labels, boxes, scores = torch.tensor([1, 2]), torch.tensor([[10., 10., 50., 60.], [0., 0., 5., 5.]]), torch.tensor([0.9, 0.1])
    drawn, n = draw_detections(image, labels, boxes, scores, score_thr=0.5, names=["a", "b"])
    assert n == 1 and drawn.dtype == torch.uint8 and drawn.shape == image.shape
    assert drawn[:, 10, 30].sum() > 0 and drawn[:, 3, 3].sum() == 0  # border of box 1 drawn, box 2 not
    untouched, n = draw_detections(image, labels, boxes, scores, score_thr=0.95)
    assert n == 0 and torch.equal(untouched, image)


def test_to_inputs_resizes_and_keeps_original_size():
    frames = [torch.full((3, 480, 640), 255, dtype=torch.uint8), torch.zeros(3, 100, 50, dtype=torch.uint8)]
    images, sizes = to_inputs(frames, 64)
    assert images.shape == (2, 3, 64, 64) and images.dtype == torch.float32
    assert images[0].min() == 1.0 and images[1].max() == 0.0
    assert sizes.tolist() == [[640, 480], [50, 100]]


def test_bad_inputs_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list_images(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no images"):
        list_images(tmp_path)
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match="could not decode image .*broken.jpg"):
        read_image(tmp_path / "broken.jpg")


def test_video_without_opencv_says_how_to_install(tmp_path, monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "cv2", None)
    with pytest.raises(ImportError, match="pip install opencv-python-headless"):
        video_frames(tmp_path / "clip.mp4")


def test_names_from_yolo_yaml(taco_dir):
    names = load_names(str(taco_dir / "data.yaml"))
    assert len(names) == 60 and names[0] == "Aluminium foil"


def test_predict_onnx_on_real_images(taco_dir, tmp_path):
    onnx_path = tmp_path / "tiny.onnx"
    export_tiny(onnx_path)
    out = tmp_path / "pred"
    records = main(["--onnx", str(onnx_path), "--input", str(taco_dir / "images"), "--limit", "3",
                    "--image-size", "64", "--score-thr", "0.0", "--batch", "2", "--out", str(out)])
    assert len(records) == 3 and len(list(out.glob("*.jpg"))) == 3
    saved = json.loads((out / "detections.json").read_text())
    assert saved["backend"].startswith("onnxruntime fp32 cpu")
    w, h = read_image(records[0]["image"]).shape[-1:-3:-1]
    for det in saved["results"][0]["detections"]:
        x0, y0, x1, y1 = det["box_xyxy"]
        assert -1 <= x0 <= x1 <= w + 1 and -1 <= y0 <= y1 <= h + 1  # boxes in original pixels


def test_predict_rejects_two_models(tmp_path):
    img = tmp_path / "a.png"
    from torchvision.io import write_png
    write_png(torch.zeros(3, 8, 8, dtype=torch.uint8), str(img))
    with pytest.raises(SystemExit, match="one of"):
        main(["--onnx", "a.onnx", "--checkpoint", "b.pth", "--input", str(img), "--out", str(tmp_path)])
