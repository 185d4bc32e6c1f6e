"""Warp a cached teacher grid to a geometrically augmented view (the ReLabel-style approximation).

A view is described by the rectangle it shows, in normalised [0, 1] coordinates of the source
image the grid was computed on: a crop is a sub-box, a zoom-out canvas a box larger than [0, 1]
(the outside is fill), a flip swaps the box's x ends. Each output cell samples the cached grid at
its centre (``grid_sample``, bilinear, align_corners=False); cells falling outside the source are
reported invalid (the teacher's tokens there depend on context the cache does not have).
Whether a warp is close enough to the online teacher is measured by benchmarks/warp_fidelity.py.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def box_theta(box: tuple[float, float, float, float]) -> torch.Tensor:
    """Affine (``F.affine_grid`` convention) from output coords to source coords for a view that
    shows ``box = (x0, y0, x1, y1)`` of the source (normalised; x0 > x1 means mirrored)."""
    x0, y0, x1, y1 = box
    return torch.tensor([[x1 - x0, 0.0, x0 + x1 - 1.0], [0.0, y1 - y0, y0 + y1 - 1.0]])


def warp_grid(grid: torch.Tensor, box, out_hw: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Cached grid [C, h, w] -> (warped grid [C, H, W], valid mask [H, W]) for the view ``box``."""
    theta = box_theta(box).to(grid)[None]
    coords = F.affine_grid(theta, [1, grid.shape[0], *out_hw], align_corners=False)
    warped = F.grid_sample(grid[None], coords, mode="bilinear", padding_mode="zeros",
                           align_corners=False)[0]
    valid = (coords.abs() <= 1).all(-1)[0]
    return warped, valid


def flip_box() -> tuple[float, float, float, float]:
    return (1.0, 0.0, 0.0, 1.0)


def crop_box(top: int, left: int, height: int, width: int, image_hw: tuple[int, int]):
    """The view of a pixel crop (then resized to the output size)."""
    h, w = image_hw
    return (left / w, top / h, (left + width) / w, (top + height) / h)


def zoom_out_box(pad: tuple[int, int, int, int], image_hw: tuple[int, int]):
    """The view of a zoom-out canvas with padding (left, top, right, bottom) in pixels."""
    h, w = image_hw
    left, top, right, bottom = pad
    return (-left / w, -top / h, (w + right) / w, (h + bottom) / h)


def mosaic_box(tile: tuple[float, float, float, float]):
    """The view of a whole mosaic canvas from the image placed in ``tile`` (normalised canvas box
    x0, y0, x1, y1): cells outside the tile are invalid for this image."""
    x0, y0, x1, y1 = tile
    sx, sy = 1.0 / (x1 - x0), 1.0 / (y1 - y0)
    return (-x0 * sx, -y0 * sy, (1 - x0) * sx, (1 - y0) * sy)
