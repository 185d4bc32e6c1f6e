"""Replayable training augmentation: every random decision is drawn up front into an :class:`AugRecord`.

The ops and their order are the official RT-DETRv4 train pipeline (base/rtv4.yml): Mosaic ->
RandomPhotometricDistort -> RandomZoomOut -> RandomIoUCrop -> SanitizeBoundingBoxes(min_size 1)
-> RandomHorizontalFlip -> Resize 640x640 -> SanitizeBoundingBoxes -> ConvertPILImage (/255) ->
ConvertBoxes (normalised cxcywh), gated per epoch by :class:`pipeline.data.policy.AugPolicy`.
The distributions are torchvision's; the random numbers come from
``np.random.default_rng([seed, epoch, index, op])`` (one stream per op, never the global RNG), so
``sample_record`` is a pure function and ``apply_record`` replays a view bit-for-bit. That is what
lets the teacher cache store views by record and the trainer find them again.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
import torchvision.transforms.v2.functional as F
from torchvision import tv_tensors
from torchvision.ops import box_convert
from torchvision.transforms import InterpolationMode

from pipeline.data.policy import AugPolicy

# independent random streams, so changing one op's settings does not change another op's draws
_GATE, _MOSAIC, _PHOTO, _ZOOM, _CROP, _FLIP = range(6)


@dataclass
class AugRecord:
    """Every random decision of one training view; with the source images it fully determines the output.

    ``mosaic``: ``partners`` (3 dataset indices), ``tile`` (shorter side of each tile), ``angle``
    (degrees), ``translate`` (fractions of the 2x2 canvas; pixels are ``round(f * W)``), ``scale``,
    ``fill``. ``photometric``: ``brightness``/``contrast``/``saturation``/``hue`` factor or None,
    ``contrast_before``, ``channel_perm`` or None. ``zoom_out``: padding ``[left, top, right, bottom]``.
    ``iou_crop``: ``[top, left, height, width]`` of the (zoomed) image. ``size``: output ``(h, w)``.
    ``phase`` 0 marks a plain (un-augmented) view.
    """

    index: int
    epoch: int = -1
    seed: int = 0
    phase: int = 0
    size: tuple[int, int] = (640, 640)
    mosaic: dict | None = None
    photometric: dict | None = None
    zoom_out: list[int] | None = None
    iou_crop: list[int] | None = None
    flip: bool = False

    def to_dict(self) -> dict:
        d = asdict(self)
        d["size"] = list(self.size)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "AugRecord":
        d = dict(d)
        d["size"] = tuple(d["size"])
        return cls(**d)

    @property
    def is_plain(self) -> bool:
        """Only flip + resize: the view is one of the two plain views a cache can hold exactly."""
        return self.mosaic is None and self.photometric is None and self.zoom_out is None and self.iou_crop is None


def _rng(seed: int, epoch: int, index: int, op: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, index, op])


def _sample_photometric(rng: np.random.Generator, p: AugPolicy) -> dict | None:
    """torchvision RandomPhotometricDistort.make_params: each factor applied with probability p."""
    out = {k: (float(rng.uniform(*r)) if rng.random() < p.photometric_p else None)
           for k, r in (("brightness", p.brightness), ("contrast", p.contrast), ("saturation", p.saturation),
                        ("hue", p.hue))}
    out["contrast_before"] = bool(rng.random() < 0.5)
    out["channel_perm"] = rng.permutation(3).tolist() if rng.random() < p.photometric_p else None
    if all(out[k] is None for k in ("brightness", "contrast", "saturation", "hue", "channel_perm")):
        return None
    return out


def _sample_iou_crop(rng: np.random.Generator, w: int, h: int, boxes: np.ndarray, p: AugPolicy) -> list[int] | None:
    """torchvision RandomIoUCrop.make_params (SSD): per drawn min-IoU option, the first of ``trials``
    random crops that keeps a box centre and reaches the IoU; option 1.0 means 'keep as is'.
    The trials of one option are drawn as one block (same distribution, vectorised)."""
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    while True:
        min_iou = p.iou_crop_options[int(rng.integers(len(p.iou_crop_options)))]
        if min_iou >= 1.0:
            return None
        scale = p.iou_crop_scale[0] + (p.iou_crop_scale[1] - p.iou_crop_scale[0]) * rng.random((p.iou_crop_trials, 2))
        pos = rng.random((p.iou_crop_trials, 2))
        new_w, new_h = (w * scale[:, 0]).astype(np.int64), (h * scale[:, 1]).astype(np.int64)
        left, top = ((w - new_w) * pos[:, 0]).astype(np.int64), ((h - new_h) * pos[:, 1]).astype(np.int64)
        right, bottom = left + new_w, top + new_h
        within = ((left[:, None] < cx) & (cx < right[:, None]) & (top[:, None] < cy) & (cy < bottom[:, None]))
        inter = ((np.minimum(right[:, None], boxes[:, 2]) - np.maximum(left[:, None], boxes[:, 0])).clip(min=0)
                 * (np.minimum(bottom[:, None], boxes[:, 3]) - np.maximum(top[:, None], boxes[:, 1])).clip(min=0))
        with np.errstate(divide="ignore", invalid="ignore"):
            aspect = new_w / new_h
            iou = inter / (area + (new_w * new_h)[:, None] - inter)
        ok = (new_w > 0) & (new_h > 0) & (p.iou_crop_aspect[0] <= aspect) & (aspect <= p.iou_crop_aspect[1])
        ok &= within.any(1) & (np.where(within, iou, -1.0).max(1, initial=-1.0) >= min_iou)
        if ok.any():
            t = int(np.argmax(ok))
            return [int(top[t]), int(left[t]), int(new_h[t]), int(new_w[t])]


def sample_record(seed: int, epoch: int, index: int, policy: AugPolicy, dataset_len: int,
                  image_size: tuple[int, int], boxes=None) -> AugRecord:
    """Draw every random decision for sample ``index`` in ``epoch``; a pure function of its arguments.

    ``image_size`` is the source image's ``(w, h)`` and ``boxes`` its XYXY absolute boxes (RandomIoUCrop's
    trials depend on them); :func:`record_for` looks both up in a dataset without decoding the image.
    """
    phase, active = policy.phase(epoch), policy.phase(epoch) in (2, 3)
    boxes = np.zeros((0, 4)) if boxes is None else np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    rec = AugRecord(index=index, epoch=epoch, seed=seed, phase=phase, size=tuple(policy.output_size))
    with_mosaic = phase == 2 and _rng(seed, epoch, index, _GATE).random() < policy.mosaic_prob
    if with_mosaic:
        r = _rng(seed, epoch, index, _MOSAIC)
        t = policy.mosaic_translate
        rec.mosaic = {"partners": r.integers(0, dataset_len, size=3).tolist(), "tile": policy.mosaic_tile,
                      "angle": float(r.uniform(-policy.mosaic_rotation, policy.mosaic_rotation)),
                      "translate": [float(r.uniform(-t, t)), float(r.uniform(-t, t))],
                      "scale": float(r.uniform(*policy.mosaic_scale)), "fill": 0}
    if active:
        rec.photometric = _sample_photometric(_rng(seed, epoch, index, _PHOTO), policy)
    if active and not with_mosaic:
        w, h = image_size
        r = _rng(seed, epoch, index, _ZOOM)
        if r.random() < policy.zoom_out_p:
            side = policy.zoom_out_side[0] + r.random() * (policy.zoom_out_side[1] - policy.zoom_out_side[0])
            cw, ch = int(w * side), int(h * side)
            left, top = int((cw - w) * r.random()), int((ch - h) * r.random())
            rec.zoom_out = [left, top, cw - left - w, ch - top - h]
            boxes = boxes + [left, top, left, top]
            w, h = cw, ch
        r = _rng(seed, epoch, index, _CROP)
        if r.random() < policy.iou_crop_p:
            rec.iou_crop = _sample_iou_crop(r, w, h, boxes, policy)
    rec.flip = bool(_rng(seed, epoch, index, _FLIP).random() < policy.flip_p)
    return rec


def record_for(dataset, policy: AugPolicy, seed: int, epoch: int, index: int) -> AugRecord:
    """:func:`sample_record` with the image size and boxes looked up via ``dataset.annotation(index)``."""
    a = dataset.annotation(index)
    return sample_record(seed, epoch, index, policy, len(dataset), (a["width"], a["height"]), a["boxes"])


def plain_record(index: int, flip: bool, size=640) -> AugRecord:
    """The un-augmented view (resize only) of sample ``index``, or its horizontal flip."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    return AugRecord(index=index, size=size, flip=bool(flip))


def photometric(image: torch.Tensor, p: dict) -> torch.Tensor:
    """RandomPhotometricDistort.transform with recorded factors, on a PIL image as in the official
    pipeline (its ops run on PIL): PIL's integer kernels are exact, fast, and thread-count independent."""
    pil = F.to_pil_image(image)
    if p["brightness"] is not None:
        pil = F.adjust_brightness(pil, p["brightness"])
    if p["contrast"] is not None and p["contrast_before"]:
        pil = F.adjust_contrast(pil, p["contrast"])
    if p["saturation"] is not None:
        pil = F.adjust_saturation(pil, p["saturation"])
    if p["hue"] is not None:
        pil = F.adjust_hue(pil, p["hue"])
    if p["contrast"] is not None and not p["contrast_before"]:
        pil = F.adjust_contrast(pil, p["contrast"])
    image = F.pil_to_tensor(pil)
    if p["channel_perm"] is not None:
        image = F.permute_channels(image, p["channel_perm"])
    return image


def _mosaic(m: dict, image, boxes, labels, load_partner):
    """Official Mosaic (use_cache False): 4 tiles resized to shorter side ``tile`` on a 2x2 canvas, then
    RandomAffine (nearest, fill 0) on the whole canvas."""
    tiles = [(image, boxes, labels)]
    for j in m["partners"]:
        pi, pt = load_partner(j)
        tiles.append((pi, pt["boxes"], pt["labels"]))
    tiles = [(F.resize(i, [m["tile"]], antialias=True), F.resize(b, [m["tile"]]), l) for i, b, l in tiles]
    th, tw = max(t[0].shape[-2] for t in tiles), max(t[0].shape[-1] for t in tiles)
    canvas = torch.full((3, 2 * th, 2 * tw), m["fill"], dtype=torch.uint8)
    all_boxes, all_labels = [], []
    for (img, b, l), (ox, oy) in zip(tiles, [(0, 0), (tw, 0), (0, th), (tw, th)]):
        canvas[:, oy:oy + img.shape[-2], ox:ox + img.shape[-1]] = img
        all_boxes.append(b.as_subclass(torch.Tensor) + torch.tensor([ox, oy, ox, oy], dtype=torch.float32))
        all_labels.append(l)
    H, W = canvas.shape[-2:]
    boxes = tv_tensors.BoundingBoxes(torch.cat(all_boxes), format="XYXY", canvas_size=(H, W))
    affine = dict(angle=m["angle"], translate=[int(round(m["translate"][0] * W)), int(round(m["translate"][1] * H))],
                  scale=m["scale"], shear=[0.0, 0.0])
    image = F.affine(tv_tensors.Image(canvas), **affine, interpolation=InterpolationMode.NEAREST, fill=m["fill"])
    return image, F.affine(boxes, **affine), torch.cat(all_labels)


def _sanitize(boxes, labels, min_size: float = 1.0):
    """SanitizeBoundingBoxes(min_size=1): drop boxes smaller than 1 px or outside the canvas."""
    _, valid = F.sanitize_bounding_boxes(boxes, min_size=min_size)
    return tv_tensors.wrap(boxes[valid], like=boxes), labels[valid]


def apply_record(record: AugRecord | dict, image, target: dict, load_partner=None, convert: bool = True):
    """Replay ``record`` on a dataset sample; deterministic bit-for-bit for the same record and inputs.

    ``load_partner(index) -> (image, target)`` loads mosaic partners (e.g. ``dataset.__getitem__``).
    ``convert=True`` returns the model input (float32 [3,H,W] in [0,1], boxes normalised cxcywh);
    ``convert=False`` the uint8 ``Image`` and XYXY ``BoundingBoxes`` in output pixels.
    """
    rec = AugRecord.from_dict(record) if isinstance(record, dict) else record
    image = tv_tensors.Image(image)
    boxes, labels = target["boxes"], target["labels"]
    if rec.mosaic is not None:
        if load_partner is None:
            raise ValueError("this record has a mosaic: pass load_partner=dataset.__getitem__")
        image, boxes, labels = _mosaic(rec.mosaic, image, boxes, labels, load_partner)
    if rec.photometric is not None:
        image = tv_tensors.Image(photometric(image.as_subclass(torch.Tensor), rec.photometric))
    if rec.zoom_out is not None:
        image, boxes = F.pad(image, rec.zoom_out, fill=0), F.pad(boxes, rec.zoom_out)
    if rec.iou_crop is not None:
        top, left, h, w = rec.iou_crop
        cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
        within = (left < cx) & (cx < left + w) & (top < cy) & (cy < top + h)
        image, boxes = F.crop(image, top, left, h, w), F.crop(boxes, top, left, h, w)
        boxes[~within] = 0  # as torchvision: marked degenerate, removed by the sanitize below
    boxes, labels = _sanitize(boxes, labels)
    if rec.flip:
        image, boxes = F.horizontal_flip(image), F.horizontal_flip(boxes)
    size = list(rec.size)
    image = F.resize(image, size, interpolation=InterpolationMode.BILINEAR, antialias=True)
    boxes, labels = _sanitize(F.resize(boxes, size), labels)
    out = {"boxes": boxes, "labels": labels, "image_id": target["image_id"], "orig_size": target["orig_size"],
           "key": target["key"], "record": rec.to_dict()}
    return to_model_input(image, out) if convert else (image, out)


def to_model_input(image, target: dict):
    """ConvertPILImage (float32 /255, no mean/std) + ConvertBoxes (normalised cxcywh), as the official."""
    h, w = image.shape[-2:]
    boxes = box_convert(target["boxes"].as_subclass(torch.Tensor), "xyxy", "cxcywh")
    target = {**target, "boxes": boxes / torch.tensor([w, h, w, h], dtype=torch.float32)}
    return image.as_subclass(torch.Tensor).float().div_(255.0), target


class AugmentedDataset(torch.utils.data.Dataset):
    """``dataset`` seen through the training pipeline: item ``i`` (or ``(epoch, i)``) -> model input.

    ``policy=None`` gives the evaluation view (resize only). The epoch comes from :meth:`set_epoch`, or
    from an ``(epoch, index)`` item, which also works with persistent DataLoader workers.
    """

    def __init__(self, dataset, policy: AugPolicy | None = None, seed: int = 0, size=640):
        self.dataset, self.policy, self.seed, self.epoch = dataset, policy, seed, 0
        self.size = size if policy is None else policy.output_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def record(self, epoch: int, index: int) -> AugRecord:
        if self.policy is None:
            return plain_record(index, flip=False, size=self.size)
        return record_for(self.dataset, self.policy, self.seed, epoch, index)

    def __getitem__(self, item):
        epoch, index = item if isinstance(item, tuple) else (self.epoch, item)
        image, target = self.dataset[index]
        return apply_record(self.record(epoch, index), image, target, load_partner=self.dataset.__getitem__)
