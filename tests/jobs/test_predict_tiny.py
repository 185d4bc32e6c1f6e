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
    with pytest.raises(ValueError, match="broken.jpg: cannot decode image"):
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
    assert len(records) == 3 and len(list(out.glob("val/*.jpg"))) == 3   # at their path under --input
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
    with pytest.raises(ValueError, match="one of"):
        main(["--onnx", "a.onnx", "--checkpoint", "b.pth", "--input", str(img), "--out", str(tmp_path)])


def test_predict_keeps_every_output_apart_and_skips_a_bad_image(tmp_path, capsys):
    """Faults: a.jpg and a.webp (or same-named files in two folders) were drawn to one file, one silently
    overwritten; one corrupt image aborted the run with nothing written."""
    from PIL import Image
    from pipeline.cli import run

    onnx_path = tmp_path / "tiny.onnx"
    export_tiny(onnx_path)
    photos = tmp_path / "photos"
    (photos / "sub").mkdir(parents=True)
    for name, shade in (("a.jpg", 40), ("a.webp", 120), ("sub/a.jpg", 200), ("b.png", 90)):
        Image.new("RGB", (48, 32), (shade, shade, shade)).save(photos / name)
    (photos / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    out = tmp_path / "pred"
    args = ["--onnx", str(onnx_path), "--input", str(photos), "--image-size", "64", "--score-thr", "1.1", "--batch",
            "2", "--out", str(out)]   # no box drawn: each output shows its own input's shade
    assert run("jobs.predict", lambda argv: __import__("jobs.predict").predict.exit_code(main(argv)), args) == 1
    drawn = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.suffix in (".jpg", ".png"))
    assert drawn == ["a.jpg", "a.webp.jpg", "b.png", "sub/a.jpg"]
    for name, shade in (("a.jpg", 40), ("a.webp.jpg", 120), ("sub/a.jpg", 200)):   # each its own input
        assert abs(float(read_image(out / name)[:, 16, 24].float().mean()) - shade) < 8, name
    saved = json.loads((out / "detections.json").read_text())["results"]
    bad = [r for r in saved if "error" in r]
    assert len(saved) == 5 and [r["image"] for r in bad] == [str(photos / "broken.jpg")]
    assert "broken.jpg: cannot decode image" in bad[0]["error"]
    err = capsys.readouterr().err
    assert "jobs.predict: error: 1 of 5 images skipped" in err and "Traceback" not in err
