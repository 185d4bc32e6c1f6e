"""PCA pictures of the teacher's patch tokens next to the student's DSI-projected F5 (the paper's
Fig. 4): both grids are projected on the first three principal components of the teacher's
tokens, so equal colours mean equal directions in the teacher's feature space."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F


def pca_rgb(teacher: torch.Tensor, student: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[C,h,w] teacher and student grids -> two [3,h,w] images in [0,1]: each token projected on
    the teacher's top-3 principal directions, scaled by the teacher's 1st-99th percentiles."""
    c, h, w = teacher.shape
    t = teacher.reshape(c, -1).T.double()
    s = student.reshape(c, -1).T.double()
    mean = t.mean(0, keepdim=True)
    _, _, v = torch.linalg.svd(t - mean, full_matrices=False)
    basis = v[:3].T                                     # [C, 3]
    tp, sp = (t - mean) @ basis, (s - mean) @ basis
    lo, hi = torch.quantile(tp, 0.01, dim=0), torch.quantile(tp, 0.99, dim=0)
    scale = (hi - lo).clamp_min(1e-12)
    to_img = lambda x: ((x - lo) / scale).clamp(0, 1).T.reshape(3, h, w).float()  # noqa: E731
    return to_img(tp), to_img(sp)


@torch.no_grad()
def feature_grids(detector, dsi, teacher, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """([B,C,h,w] teacher tokens, [B,C,h,w] projected student F5) of [B,3,H,W] images in [0,1]."""
    _, f5 = detector.encoder(detector.backbone(images))
    return teacher(images), dsi.project(f5)


def save_panel(image: torch.Tensor, teacher_rgb: torch.Tensor, student_rgb: torch.Tensor, path: str | Path,
               title: str = "", cosine: float | None = None) -> Path:
    """One PNG: the input, the teacher PCA map and the student PCA map side by side."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    size = image.shape[-2:]
    up = lambda x: F.interpolate(x[None], size=size, mode="nearest")[0]  # noqa: E731
    fig, axes = plt.subplots(1, 3, figsize=(10.5, 3.8))
    names = ["input", "teacher patch tokens (PCA)",
             "student F5 -> DSI projector (PCA)" + (f"\ncosine to teacher {cosine:.3f}" if cosine is not None else "")]
    for ax, img, name in zip(axes, (image, up(teacher_rgb), up(student_rgb)), names):
        ax.imshow(img.permute(1, 2, 0).clamp(0, 1).numpy())
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
