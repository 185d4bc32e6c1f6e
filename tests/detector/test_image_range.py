"""The model warns once per process on float images outside [0, 1] (0-255 floats, normalised inputs)."""
import warnings

import pytest
import torch

import detector.model as model_mod
from detector import build_detector


def test_warns_once_on_images_outside_unit_range(monkeypatch):
    monkeypatch.setattr(model_mod, "_warned_range", False)
    model = build_detector("s", num_classes=2, num_queries=10).eval()
    image = torch.rand(1, 3, 64, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad():
            model(image)                          # in range: silent
    with pytest.warns(UserWarning, match=r"outside the \[0, 1\].*divide 0-255 images by 255"):
        with torch.no_grad():
            model(image * 255)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad():
            model(image * 255)                    # once per process
