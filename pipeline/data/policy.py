"""The official ``stop_epoch`` augmentation policy and the settings of its ops (base/rtv4.yml, dataloader.yml).

Phases for ``epochs = [e0, e1, e2]`` (official ``Compose.stop_epoch_forward``):

1. ``epoch < e0``: no policy op (flip + resize only);
2. ``e0 <= epoch < e1``: Mosaic with probability ``mosaic_prob``; a mosaic sample skips ZoomOut and
   IoUCrop; PhotometricDistort stays on;
3. ``e1 <= epoch < e2``: PhotometricDistort, ZoomOut and IoUCrop, no Mosaic;
4. ``epoch >= e2``: no policy op.

Horizontal flip (``flip_p``, 0.5 officially) and the final resize are never switched off by the phases.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from teacher_cache.views import check_policy_epochs, phase_epochs, policy_phase


@dataclass(frozen=True)
class AugPolicy:
    epochs: tuple[int, int, int] = (4, 29, 50)  # RT-DETRv4-L/X; S (4, 64, 120), M (4, 49, 90)
    mosaic_prob: float = 0.5
    mosaic_tile: int | None = None  # Mosaic output_size (tile shorter side); None: half the output, 320 at 640
    mosaic_rotation: float = 10.0
    mosaic_translate: float = 0.1
    mosaic_scale: tuple[float, float] = (0.5, 1.5)
    photometric_p: float = 0.5  # torchvision RandomPhotometricDistort defaults below
    brightness: tuple[float, float] = (0.875, 1.125)
    contrast: tuple[float, float] = (0.5, 1.5)
    saturation: tuple[float, float] = (0.5, 1.5)
    hue: tuple[float, float] = (-0.05, 0.05)
    zoom_out_p: float = 0.5
    zoom_out_side: tuple[float, float] = (1.0, 4.0)
    iou_crop_p: float = 0.8  # torchvision RandomIoUCrop defaults below
    iou_crop_scale: tuple[float, float] = (0.3, 1.0)
    iou_crop_aspect: tuple[float, float] = (0.5, 2.0)
    iou_crop_options: tuple[float, ...] = (0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0)
    iou_crop_trials: int = 40
    flip_p: float = 0.5
    output_size: tuple[int, int] = (640, 640)  # (h, w), no aspect preservation; an int means square

    def __post_init__(self):
        size = self.output_size
        size = (int(size), int(size)) if isinstance(size, int) else tuple(int(s) for s in size)
        object.__setattr__(self, "output_size", size)
        object.__setattr__(self, "epochs", check_policy_epochs(self.epochs))
        if self.mosaic_tile is None:
            object.__setattr__(self, "mosaic_tile", size[0] // 2)

    def phase(self, epoch: int) -> int:
        return policy_phase(self.epochs, epoch)

    def phase_epochs(self, phase: int) -> range:
        """The epochs of ``phase`` (phase 4 is open-ended: ``range(e2, e2 + 1)`` stands for it)."""
        return phase_epochs(self.epochs, phase)

    @classmethod
    def from_recipe(cls, recipe, output_size: int = 640) -> "AugPolicy":
        """The policy of a :class:`pipeline.train.recipe.Recipe` (its ``policy_epochs``, ``mosaic_prob`` and
        ``flip_prob``: 0 for the RT-CO-DETR distillation stage, which only resized)."""
        return cls(epochs=tuple(recipe.policy_epochs), mosaic_prob=recipe.mosaic_prob, flip_p=recipe.flip_prob,
                   output_size=output_size)

    def to_dict(self) -> dict:
        return asdict(self)
