"""Images and video frames into the deploy graph's inputs.

Preprocessing is the official torch/TensorRT inference one (tools/inference/torch_inf.py,
trt_inf.py), which matches training and evaluation: a plain (not aspect-preserving) resize to
size x size, values in [0,1], no mean/std; `orig_target_sizes` carries each original (w, h), so
the graph returns boxes in original-image pixels.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import torch
from torchvision.transforms.v2.functional import resize

from pipeline.data.dataset import IMAGE_EXTENSIONS, DatasetError, decode_rgb

IMAGE_EXTS = set(IMAGE_EXTENSIONS)
VIDEO_EXTS = {".mp4", ".avi", ".mov", ".mkv", ".webm"}


def list_images(source: str | Path, limit: int | None = None) -> list[Path]:
    """An image file, or the images of a directory (recursively, sorted)."""
    p = Path(source)
    if p.is_file():
        if p.suffix.lower() not in IMAGE_EXTS:
            raise ValueError(f"{p} is not an image ({', '.join(sorted(IMAGE_EXTS))})")
        return [p]
    if not p.is_dir():
        raise FileNotFoundError(f"{p} does not exist: pass an image, a folder of images or a video")
    files = sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_EXTS)
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(sorted(IMAGE_EXTS))}) under {p}")
    return files[:limit] if limit else files


def read_image(path: str | Path) -> torch.Tensor:
    """uint8 [3,H,W] RGB, decoded as training and evaluation decode (16-bit scaled to 8 bits); a file that
    cannot be read or decoded raises :class:`DatasetError` naming it."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise DatasetError(f"{path}: cannot read image ({e.strerror})") from None
    return decode_rgb(data, str(path))


def to_inputs(frames: list[torch.Tensor], size: int = 640) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 [3,H,W] frames -> (images float [N,3,size,size] in [0,1], orig_target_sizes int64 [N,2] (w,h))."""
    # uint8 antialiased bilinear resize, then /255: what PIL Resize + ToTensor give in training
    images = torch.stack([resize(f, [size, size], antialias=True) for f in frames]).float() / 255.0
    sizes = torch.tensor([[f.shape[-1], f.shape[-2]] for f in frames], dtype=torch.int64)
    return images, sizes


def video_frames(path: str | Path) -> tuple[Iterator[torch.Tensor], float]:
    """(uint8 [3,H,W] RGB frames, fps) of a video through OpenCV (optional dependency)."""
    try:
        import cv2
    except ImportError:
        raise ImportError(f"reading the video {path} needs OpenCV, which is not installed: "
                          f"pip install opencv-python-headless (or pass a folder of frames)") from None
    cap = cv2.VideoCapture(str(path))
    if not cap.isOpened():
        raise ValueError(f"OpenCV could not open the video {path}")
    fps = cap.get(cv2.CAP_PROP_FPS) or 25.0

    def frames():
        try:
            while True:
                ok, bgr = cap.read()
                if not ok:
                    return
                yield torch.from_numpy(bgr[:, :, ::-1].copy()).permute(2, 0, 1)
        finally:
            cap.release()
    return frames(), fps
