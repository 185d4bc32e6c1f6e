"""The one comparison of two backends' detections: pair them per image, then measure the pairs.

Two modes share the selection, the Hungarian pairing and the statistics:

* ``mode="parity"`` (export checks: onnxruntime or TensorRT fp32 against torch fp32). Every
  top-k reference detection, except those within ``tie_tol`` of the cut score (several queries may
  tie there), is paired with a candidate detection at minimum box L1 + score difference, a label
  mismatch forbidden; two backends may order near-equal scores differently, and identical lists
  pair in order. Returns a :class:`Parity` (max abs box and score differences over the pairs).
* ``mode="divergence"`` (reduced precision: FP16 engines, autocast, against FP32). Users report
  D-FINE/DEIM/RT-DETR FP16 TensorRT engines that lose half their detections or return all-zero
  labels (D-FINE #44, #98; DEIMv2 #60, #112; TensorRT #3652). Raw-tensor parity does not catch this
  usefully (top-k lists reorder); what matters is whether the confident detections survive. So each
  side keeps its detections above a score threshold, they are paired by IoU (same label preferred),
  and a :class:`Divergence` reports recall, label agreement, box shift and score difference. With
  random weights no score is confident; then the reference's top-k are looked up among all the
  candidate's detections (near-tied scores may reorder, so its own top-k would not do).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from scipy.optimize import linear_sum_assignment
from torchvision.ops import box_iou

MODES = ("parity", "divergence")


@dataclass
class Parity:
    """Agreement of a candidate's (labels, boxes, scores) with a reference after postprocessing."""

    reference: str
    candidate: str
    max_abs_diff_boxes: float
    max_abs_diff_scores: float
    label_agreement: float
    n_compared: int

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Divergence:
    reference: str
    candidate: str
    selection: str          # "score>=0.5", or "top-50" of the reference against all candidate detections
    n_images: int
    n_reference: int        # selected reference detections
    n_candidate: int
    recall: float           # reference detections paired at IoU >= iou_thr
    label_agreement: float  # among pairs
    mean_iou: float         # among pairs
    mean_box_shift_px: float  # mean abs corner difference among pairs
    max_score_diff: float   # among pairs
    diverged: bool
    reasons: list[str]

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        s = (f"{self.candidate} vs {self.reference} ({self.selection}, {self.n_images} images): "
             f"recall {self.recall:.3f} of {self.n_reference}, labels agree {self.label_agreement:.3f}, "
             f"mean IoU {self.mean_iou:.3f}, box shift {self.mean_box_shift_px:.2f}px, "
             f"max score diff {self.max_score_diff:.4f}")
        return s + (f"  DIVERGED: {'; '.join(self.reasons)}" if self.diverged else "")


def _select(labels, boxes, scores, score_thr, top_k):
    if top_k is not None:
        idx = scores.argsort(descending=True)[:top_k]
    elif score_thr is not None:
        idx = (scores >= score_thr).nonzero().flatten()
    else:
        idx = torch.arange(len(scores))
    return labels[idx], boxes[idx].double(), scores[idx].double()


def compare_detections(ref, cand, reference: str = "reference", candidate: str = "candidate",
                       mode: str = "divergence", *, score_thr: float = 0.5, top_k: int | None = None,
                       iou_thr: float = 0.5, tie_tol: float = 1e-4, min_recall: float = 0.9,
                       min_label_agreement: float = 0.9, max_count_ratio: float = 1.5) -> Parity | Divergence:
    """Compare batched (labels [N,K], boxes [N,K,4] xyxy, scores [N,K]) of two backends.

    ``mode="parity"``: all top-k detections but the ties at the cut (``tie_tol``), paired by box L1
    + score difference with equal labels; returns :class:`Parity`. ``mode="divergence"``: both
    sides keep detections scoring >= ``score_thr`` (with ``top_k``, the reference keeps its top-k
    and the candidate everything), paired by IoU >= ``iou_thr``, same label preferred; returns
    :class:`Divergence`, with ``diverged`` set when recall, label agreement or (threshold mode) the
    ratio of detection counts crosses its limit, and ``reasons`` naming each.
    """
    if mode not in MODES:
        raise ValueError(f"compare_detections: mode must be one of {MODES}, got {mode!r}")
    ref = [torch.as_tensor(x) for x in ref]
    cand = [torch.as_tensor(x) for x in cand]
    n_ref = n_cand = n_pair = same = 0
    iou_sum = shift_sum = max_bd = max_sd = 0.0
    for i in range(len(ref[0])):
        if mode == "parity":
            keep = ref[2][i].double() > ref[2][i].double().min() + tie_tol
            rl, rb, rs = ref[0][i][keep], ref[1][i][keep].double(), ref[2][i][keep].double()
            cl, cb, cs = cand[0][i], cand[1][i].double(), cand[2][i].double()
        else:
            rl, rb, rs = _select(ref[0][i], ref[1][i], ref[2][i], score_thr, top_k)
            cl, cb, cs = _select(cand[0][i], cand[1][i], cand[2][i], None if top_k else score_thr, None)
        n_ref, n_cand = n_ref + len(rl), n_cand + len(cl)
        if len(rl) == 0 or len(cl) == 0:
            continue
        same_label = rl[:, None] == cl[None]
        if mode == "parity":
            cost = (rb[:, None] - cb[None]).abs().sum(-1) + (rs[:, None] - cs[None]).abs() + 1e6 * ~same_label
            r, c = linear_sum_assignment(cost.numpy())
        else:
            iou = box_iou(rb, cb)
            # prefer the same label among overlapping boxes: a query can carry several labels
            r, c = linear_sum_assignment(-(iou + same_label * (iou >= iou_thr)).numpy())
            ok = (iou[r, c] >= iou_thr).numpy()
            r, c = r[ok], c[ok]
            iou_sum += float(iou[r, c].sum())
        n_pair += len(r)
        same += int(same_label[r, c].sum())
        if len(r):
            shift_sum += float((rb[r] - cb[c]).abs().mean(-1).sum())
            max_bd = max(max_bd, float((rb[r] - cb[c]).abs().max()))
            max_sd = max(max_sd, float((rs[r] - cs[c]).abs().max()))
    if mode == "parity":
        return Parity(reference, candidate, max_bd, max_sd, same / max(n_pair, 1), n_pair)
    recall = n_pair / n_ref if n_ref else 1.0
    agree = same / n_pair if n_pair else (1.0 if n_ref == 0 else 0.0)
    reasons = []
    if recall < min_recall:
        reasons.append(f"only {recall:.0%} of {reference} detections found (< {min_recall:.0%})")
    if agree < min_label_agreement:
        reasons.append(f"labels agree on {agree:.0%} of pairs (< {min_label_agreement:.0%})")
    lo, hi = sorted((n_ref, n_cand))
    if top_k is None and hi > max_count_ratio * max(lo, 1) and hi - lo > 2:
        reasons.append(f"detection counts differ: {n_ref} vs {n_cand}")
    selection = f"top-{top_k} vs all" if top_k is not None else f"score>={score_thr}"
    return Divergence(reference, candidate, selection, len(ref[0]), n_ref, n_cand, recall, agree,
                      iou_sum / max(n_pair, 1), shift_sum / max(n_pair, 1), max_sd, bool(reasons), reasons)


def max_score(outputs) -> float:
    """Highest score over a batch of detections (tells whether a threshold selects anything)."""
    return float(torch.as_tensor(outputs[2]).max())
