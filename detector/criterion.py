"""DEIM / D-FINE training criterion used by RT-DETRv4 (official ``RTv4Criterion`` without DSI).

Terms (weights are the official defaults, ``DEFAULT_WEIGHTS``):

* ``loss_mal``  Matchability-Aware Loss (DEIM, CVPR 2025): BCE against IoU^gamma on the matched class,
  weighted by sigmoid(p)^gamma on negatives; per-layer Hungarian matching.
* ``loss_bbox`` / ``loss_giou``  L1 on normalised cxcywh and 1 - GIoU (DETR).
* ``loss_fgl``  Fine-Grained Localization loss (D-FINE, arXiv 2410.13842): two-bin interpolated cross entropy
  of the edge distributions against the GT edge distances measured from the detached reference
  boxes, IoU-weighted.
* ``loss_ddf``  Decoupled Distillation Focal loss (D-FINE GO-LSD): KL(T=5) from the last
  decoder layer's distributions to every earlier layer; matched queries weighted by IoU, others by
  the teacher's confidence, both groups averaged separately and mixed by sqrt(count * 8 / B).

Index sets (official behaviour): box/FGL/DDF losses of the final, aux and pre outputs use the
"uni-set" (union of the matches of all layers; most frequent pair per query), normalised by its
size; the encoder proposals use it for boxes only; MAL always uses each layer's own matching;
denoising outputs use the fixed denoising indices with num_boxes * dn_num_group. Keys carry the
official suffixes ``_aux_i``, ``_pre``, ``_enc_i``, ``_dn_i``, ``_dn_pre``.

The DSI distillation term is not part of this module (see ``detector/dsi.py``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from .box_ops import cxcywh_to_xyxy, paired_iou_giou
from .fdr import bbox2distance
from .matcher import HungarianMatcher, Indices

DEFAULT_WEIGHTS = {"loss_mal": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0, "loss_fgl": 0.15, "loss_ddf": 1.5}


# --------------------------------------------------------------------------------------------------
# Matching bookkeeping.
# --------------------------------------------------------------------------------------------------
def union_indices(indices_list: list[Indices]) -> Indices:
    """The GO-LSD "uni-set": per image, the union of all layers' (query, target) matches.

    A query matched to different targets across layers keeps its most frequent pair; pairs are
    ordered by decreasing count, exactly as the official ``_get_go_indices`` (run on the CPU).
    """
    result = []
    for per_image in zip(*indices_list):
        rows = torch.cat([src for src, _ in per_image])
        cols = torch.cat([tgt for _, tgt in per_image])
        pairs, counts = torch.unique(torch.stack([rows, cols], 1), dim=0, return_counts=True)
        # Same (unstable) argsort as the official code: it decides which pair wins a tie.
        pairs = pairs[torch.argsort(counts.cpu(), descending=True)]
        query, order = torch.sort(pairs[:, 0], stable=True)
        first = torch.ones_like(query, dtype=torch.bool)
        first[1:] = query[1:] != query[:-1]
        keep = order[first].sort().values
        result.append((pairs[keep, 0], pairs[keep, 1]))
    return result


def denoising_indices(dn_meta: dict, targets: list[dict[str, Tensor]]) -> Indices:
    """Fixed (query, target) pairs of the positive denoising queries (dn_meta of the decoder)."""
    positive, groups = dn_meta["dn_positive_idx"], dn_meta["dn_num_group"]
    indices = []
    for i, t in enumerate(targets):
        n = len(t["labels"])
        tgt = torch.arange(n, dtype=torch.int64, device=t["labels"].device).tile(groups)
        src = positive[i] if n > 0 else torch.zeros(0, dtype=torch.int64, device=tgt.device)
        if len(src) != len(tgt):
            raise ValueError(f"dn_meta has {len(src)} positive queries for image {i}, expected "
                             f"{n} targets x {groups} groups; pass the same targets to the model and the criterion")
        indices.append((src, tgt))
    return indices


def indices_to_device(groups: list[Indices], device: torch.device) -> list[Indices]:
    """Host (query, target) index pairs of many layers to ``device`` in one copy, pinned and
    non-blocking on CUDA: a blocking copy per tensor is a host sync each (two per layer and image)."""
    flat = [t for group in groups for pair in group for t in pair]
    if not flat or all(t.device == device for t in flat):
        return groups
    host = torch.cat([t.reshape(-1).to(torch.int64) for t in flat])
    if device.type == "cuda":
        host = host.pin_memory()
    moved = iter(host.to(device, non_blocking=True).split([t.numel() for t in flat]))
    return [[(next(moved), next(moved)) for _ in group] for group in groups]


def _batch_idx(indices: Indices) -> tuple[Tensor, Tensor]:
    batch = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
    return batch, torch.cat([src for src, _ in indices])


def _average_over_world(counts: list[int], device: torch.device) -> list[float]:
    """Counts averaged over the DDP world, each clamped to >= 1: under DDP one all-reduce and one host
    sync; on one process the counts are host integers already and nothing touches the device."""
    if not (dist.is_available() and dist.is_initialized()):
        return [max(float(c), 1.0) for c in counts]
    t = torch.as_tensor(counts, dtype=torch.float, device=device)
    dist.all_reduce(t)
    return torch.clamp(t / dist.get_world_size(), min=1).tolist()


@dataclass
class _StepCache:
    """Per-call state shared between layers, as in the official criterion.

    FGL targets are computed from the first output that needs them (the final layer, resp. the
    first dn layer) and reused for the others (all layers share the same reference boxes). The DDF
    mixing weights come from the last non-denoising layer and are reused for the dn layers.
    """
    fgl: tuple[Tensor, Tensor, Tensor] | None = None
    fgl_dn: tuple[Tensor, Tensor, Tensor] | None = None
    ddf_mix: tuple[Tensor, Tensor] | None = None


class Criterion(nn.Module):
    """RT-DETRv4 / DEIM-D-FINE set criterion; ``criterion(outputs, targets)`` -> weighted losses.

    ``outputs`` is the official D-FINE training dict (pred_logits, pred_boxes, pred_corners,
    ref_points, up, reg_scale, aux_outputs, pre_outputs, enc_aux_outputs, enc_meta and, with
    denoising, dn_outputs, dn_pre_outputs, dn_meta); ``targets`` is a list of dicts with "labels"
    int64 [N] in 0..C-1 and "boxes" [N,4] normalised cxcywh on the outputs' device. The total loss
    is ``sum(loss_dict.values())``. Like the official trainer, call it with autocast disabled.

    Beyond the official code (which would fail there): no ``aux_outputs`` is allowed, a
    class-agnostic encoder (``enc_meta["class_agnostic"]``) is also matched with label 0, and dn
    layers seen before any aux layer take their DDF mixing weights from their own mask.
    """

    def __init__(self, num_classes: int, matcher: HungarianMatcher | None = None,
                 weight_dict: dict[str, float] | None = None, gamma: float = 1.5,
                 mal_alpha: float | None = None, reg_max: int = 32, use_uni_set: bool = True,
                 ddf_temperature: float = 5.0, check_labels: bool = True):
        super().__init__()
        self.num_classes = num_classes
        self.check_labels = check_labels
        self.matcher = matcher if matcher is not None else HungarianMatcher()
        self.weight_dict = dict(DEFAULT_WEIGHTS if weight_dict is None else weight_dict)
        self.gamma, self.mal_alpha = gamma, mal_alpha
        self.reg_max, self.use_uni_set, self.ddf_temperature = reg_max, use_uni_set, ddf_temperature

    # ------------------------------------------------------------------------------------ terms
    def loss_mal(self, out: dict, targets: list[dict], indices: Indices, num_boxes: float) -> dict[str, Tensor]:
        """DEIM MAL: BCE(p, IoU^gamma * onehot) weighted by sigmoid(p)^gamma on negatives."""
        logits = out["pred_logits"]
        idx = _batch_idx(indices)
        labels = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices)])
        with torch.no_grad():
            iou, _ = paired_iou_giou(out["pred_boxes"][idx], _matched_boxes(targets, indices))
        classes = torch.full(logits.shape[:2], logits.shape[-1], dtype=torch.int64, device=logits.device)
        classes[idx] = labels
        # == arange instead of F.one_hot, whose range check syncs on the CPU (the background column drops)
        onehot = (classes.unsqueeze(-1) == torch.arange(logits.shape[-1], device=logits.device)).to(torch.int64)
        score = torch.zeros(logits.shape[:2], dtype=logits.dtype, device=logits.device)
        score[idx] = iou.to(logits.dtype)
        target = (score.unsqueeze(-1) * onehot).pow(self.gamma)
        neg_weight = logits.sigmoid().detach().pow(self.gamma)
        if self.mal_alpha is not None:
            neg_weight = self.mal_alpha * neg_weight
        weight = neg_weight * (1 - onehot) + onehot
        loss = F.binary_cross_entropy_with_logits(logits, target, weight=weight, reduction="none")
        return {"loss_mal": loss.mean(1).sum() * logits.shape[1] / num_boxes}

    def loss_boxes(self, out: dict, targets: list[dict], indices: Indices, num_boxes: float) -> dict[str, Tensor]:
        """L1 on normalised cxcywh and 1 - GIoU, summed over matches / num_boxes."""
        src = out["pred_boxes"][_batch_idx(indices)]
        tgt = _matched_boxes(targets, indices)
        _, giou = paired_iou_giou(src, tgt)
        return {"loss_bbox": F.l1_loss(src, tgt, reduction="none").sum() / num_boxes,
                "loss_giou": (1 - giou).sum() / num_boxes}

    def loss_local(self, out: dict, targets: list[dict], indices: Indices, num_boxes: float,
                   up: Tensor, reg_scale: Tensor, cache: _StepCache, is_dn: bool) -> dict[str, Tensor]:
        """D-FINE FGL on the matched edge distributions and DDF self-distillation from the last layer."""
        if "pred_corners" not in out:
            return {}
        bins = self.reg_max + 1
        idx = _batch_idx(indices)
        tgt = _matched_boxes(targets, indices)
        corners = out["pred_corners"][idx].reshape(-1, bins)
        fgl = cache.fgl_dn if is_dn else cache.fgl
        if fgl is None:
            with torch.no_grad():
                fgl = bbox2distance(out["ref_points"][idx].detach(), cxcywh_to_xyxy(tgt), self.reg_max, reg_scale, up)
            if is_dn:
                cache.fgl_dn = fgl
            else:
                cache.fgl = fgl
        index, w_right, w_left = fgl
        with torch.no_grad():
            iou, _ = paired_iou_giou(out["pred_boxes"][idx], tgt)
        left = index.long()
        ce = F.cross_entropy(corners, left, reduction="none") * w_left \
            + F.cross_entropy(corners, left + 1, reduction="none") * w_right
        losses = {"loss_fgl": (ce * iou.repeat_interleave(4).float()).sum() / num_boxes}

        if "teacher_corners" in out:
            ddf = self._ddf(out, idx, iou, cache, is_dn)
            if ddf is not None:
                losses["loss_ddf"] = ddf
        return losses

    def _ddf(self, out: dict, idx: tuple[Tensor, Tensor], iou: Tensor, cache: _StepCache, is_dn: bool) -> Tensor | None:
        bins, T = self.reg_max + 1, self.ddf_temperature
        pred = out["pred_corners"].reshape(-1, bins)
        teacher = out["teacher_corners"].reshape(-1, bins)
        if _same_memory(pred, teacher):  # the last layer is its own teacher
            return None
        weight = out["teacher_logits"].detach().sigmoid().max(dim=-1)[0]
        matched = torch.zeros_like(weight, dtype=torch.bool)
        matched[idx] = torch.ones_like(idx[0], dtype=torch.bool)   # a Python True is a host copy on CUDA
        weight[idx] = iou.to(weight.dtype)
        weight = weight.repeat_interleave(4, dim=-1).reshape(-1)
        matched = matched.repeat_interleave(4, dim=-1).reshape(-1)
        kl = F.kl_div(F.log_softmax(pred / T, dim=1), F.softmax(teacher.detach() / T, dim=1), reduction="none")
        loss = weight * (T ** 2) * kl.sum(-1)
        if not is_dn or cache.ddf_mix is None:
            scale = 8 / out["pred_boxes"].shape[0]  # keeps the mix independent of the per-GPU batch
            cache.ddf_mix = ((matched.sum() * scale) ** 0.5, ((~matched).sum() * scale) ** 0.5)
        w_pos, w_neg = cache.ddf_mix
        # masked means (0 for an empty group) instead of boolean indexing: no host sync
        n_pos = matched.sum()
        pos = torch.where(matched, loss, 0).sum() / n_pos.clamp(min=1)
        neg = torch.where(matched, 0, loss).sum() / (matched.numel() - n_pos).clamp(min=1)
        ddf = (pos * w_pos + neg * w_neg) / (w_pos + w_neg)
        # official torch.equal skip (zero-initialised heads: every layer equals the teacher) decided on
        # the device: the term is then an exact 0 instead of an absent key
        return torch.where(torch.eq(pred, teacher).all(), torch.zeros_like(ddf), ddf)

    # ---------------------------------------------------------------------------------- forward
    def _layer(self, out: dict, targets: list[dict], cls_indices: Indices, box_indices: Indices,
               num_cls: float, num_box: float, suffix: str, local: dict | None) -> dict[str, Tensor]:
        losses = {**self.loss_mal(out, targets, cls_indices, num_cls),
                  **self.loss_boxes(out, targets, box_indices, num_box)}
        if local is not None:
            losses.update(self.loss_local(out, targets, box_indices, num_box, **local))
        return {k + suffix: v * self.weight_dict[k] for k, v in losses.items() if k in self.weight_dict}

    def forward(self, outputs: dict, targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        device = outputs["pred_logits"].device
        self._check(outputs, targets)
        aux = outputs.get("aux_outputs", [])
        pre = outputs.get("pre_outputs")
        enc = outputs.get("enc_aux_outputs", [])
        enc_targets = targets
        if enc and outputs.get("enc_meta", {}).get("class_agnostic", False):
            enc_targets = [{**t, "labels": torch.zeros_like(t["labels"])} for t in targets]

        # every layer's matching in one batch: one device-to-host copy of the costs per step
        layers = [outputs, *aux, *([pre] if pre is not None else []), *enc]
        matches = self.matcher.match_many(layers, [targets] * (len(layers) - len(enc)) + [enc_targets] * len(enc))
        go = union_indices(matches)
        num_boxes, num_go = _average_over_world([sum(len(t["labels"]) for t in targets),
                                                 sum(len(src) for src, _ in go)], device)
        # ... and one host-to-device copy of all the resulting indices
        go, *matches = indices_to_device([go, *matches], device)
        match_main, match_aux = matches[0], matches[1:1 + len(aux)]
        match_pre = matches[1 + len(aux)] if pre is not None else None
        match_enc = matches[len(layers) - len(enc):]
        box_idx, num_box = (go, num_go) if self.use_uni_set else (None, num_boxes)

        cache = _StepCache()
        local = {"up": outputs.get("up"), "reg_scale": outputs.get("reg_scale"), "cache": cache, "is_dn": False}
        decoder = [(outputs, match_main, "", local)]
        decoder += [(a, m, f"_aux_{i}", local) for i, (a, m) in enumerate(zip(aux, match_aux))]
        decoder += [(pre, match_pre, "_pre", local)] if pre is not None else []
        encoder = [(e, m, f"_enc_{i}", None) for i, (e, m) in enumerate(zip(enc, match_enc))]
        losses = {}
        for out, m, suffix, local_args in decoder + encoder:
            tgts = targets if local_args is not None else enc_targets
            losses.update(self._layer(out, tgts, m, m if box_idx is None else box_idx, num_boxes, num_box,
                                      suffix, local_args))

        if "dn_outputs" in outputs:
            dn_idx = denoising_indices(outputs["dn_meta"], targets)   # built on the device
            dn_num = num_boxes * outputs["dn_meta"]["dn_num_group"]
            dn_local = {**local, "is_dn": True}
            for i, out in enumerate(outputs["dn_outputs"]):
                if i == len(outputs["dn_outputs"]) - 1:  # the dn teacher itself: no DDF (official)
                    out = {k: v for k, v in out.items() if k not in ("teacher_corners", "teacher_logits")}
                losses.update(self._layer(out, targets, dn_idx, dn_idx, dn_num, dn_num, f"_dn_{i}", dn_local))
            if "dn_pre_outputs" in outputs:
                losses.update(self._layer(outputs["dn_pre_outputs"], targets, dn_idx, dn_idx, dn_num, dn_num,
                                          "_dn_pre", None))
        return {k: torch.nan_to_num(v, nan=0.0) for k, v in losses.items()}

    def _check(self, outputs: dict, targets: list[dict]) -> None:
        if len(targets) != outputs["pred_logits"].shape[0]:
            raise ValueError(f"Criterion: {len(targets)} targets for a batch of {outputs['pred_logits'].shape[0]}")
        if outputs["pred_logits"].shape[-1] != self.num_classes:
            raise ValueError(f"Criterion: pred_logits has {outputs['pred_logits'].shape[-1]} classes, "
                             f"criterion was built with num_classes={self.num_classes}")
        if self.check_labels:
            check_labels(targets, self.num_classes)


def check_labels(targets: list[dict], num_classes: int) -> None:
    """Raise if a target label is outside 0..num_classes-1 (one host sync for device tensors: the
    trainer calls it on the loader's host batch and builds the criterion with check_labels=False)."""
    labels = torch.cat([t["labels"] for t in targets])
    if len(labels) and bool((labels < 0).any() | (labels >= num_classes).any()):
        raise ValueError(f"Criterion: target labels outside 0..{num_classes - 1} (got "
                         f"{labels.min().item()}..{labels.max().item()}); map class ids to contiguous 0..C-1")


def _same_memory(a: Tensor, b: Tensor) -> bool:
    """a and b are views of the same memory (metadata only: no host sync, unlike torch.equal)."""
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()


def _matched_boxes(targets: list[dict], indices: Indices) -> Tensor:
    return torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices)], dim=0)
