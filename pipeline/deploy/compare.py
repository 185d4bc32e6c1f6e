"""Do reduced-precision detections still match full-precision ones? (FP16 engines vs FP32)

Users report D-FINE/DEIM/RT-DETR FP16 TensorRT engines that lose half their detections or
return all-zero labels (D-FINE #44, #98; DEIMv2 #60, #112; TensorRT #3652), depending on GPU
and TensorRT version. Parity of raw tensors does not catch this usefully (top-k lists reorder);
what matters is whether the confident detections survive. So: keep each side's detections above
a score threshold, pair them by IoU (same label preferred) with the Hungarian algorithm, and report
how many reference detections were recovered, label agreement of the pairs, box shift and score
difference. With random weights no score is confident; then the reference's top-k are looked up
among all the candidate's detections (near-tied scores may reorder, so its own top-k would not do).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from scipy.optimize import linear_sum_assignment
from torchvision.ops import box_iou


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


def compare_detections(ref, cand, reference: str, candidate: str, score_thr: float = 0.5,
                       top_k: int | None = None, iou_thr: float = 0.5, min_recall: float = 0.9,
                       min_label_agreement: float = 0.9, max_count_ratio: float = 1.5) -> Divergence:
    """Compare batched (labels [N,K], boxes [N,K,4] xyxy, scores [N,K]) of two backends.

    Both sides keep detections scoring >= `score_thr`; with `top_k`, the reference keeps its
    top-k and the candidate keeps everything. `diverged` is set when recall, label agreement or
    (threshold mode) the ratio of detection counts crosses its limit; `reasons` names each.
    """
    n_ref = n_cand = n_pair = same = 0
    iou_sum = shift_sum = 0.0
    max_sd = 0.0
    for i in range(len(ref[0])):
        rl, rb, rs = _select(ref[0][i], ref[1][i], ref[2][i], score_thr, top_k)
        cl, cb, cs = _select(cand[0][i], cand[1][i], cand[2][i], None if top_k else score_thr, None)
        n_ref, n_cand = n_ref + len(rl), n_cand + len(cl)
        if len(rl) == 0 or len(cl) == 0:
            continue
        iou = box_iou(rb, cb)
        # prefer the same label among overlapping boxes: a query can carry several labels
        r, c = linear_sum_assignment(-(iou + (rl[:, None] == cl[None]) * (iou >= iou_thr)).numpy())
        ok = iou[r, c] >= iou_thr
        r, c = r[ok.numpy()], c[ok.numpy()]
        n_pair += len(r)
        same += int((rl[r] == cl[c]).sum())
        iou_sum += float(iou[r, c].sum())
        shift_sum += float((rb[r] - cb[c]).abs().mean(-1).sum())
        if len(r):
            max_sd = max(max_sd, float((rs[r] - cs[c]).abs().max()))
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
