"""D-FINE decoder as used by RT-DETRv4 (official `engine/rtv4/dfine_decoder.py`, DFINETransformer).

Pipeline (D-FINE arXiv 2410.13842, RT-DETR arXiv 2304.08069):
  encoder maps -> flattened memory -> encoder head scores every anchor -> top-Q query selection
  (detached content + anchor-refined boxes) -> L decoder layers (self-attention, multi-scale
  deformable cross-attention with a gate, FFN) -> per layer: class logits + LQE quality term, and
  Fine-grained Distribution Refinement of the box (corner distributions accumulated across layers).

Module names reproduce the official state-dict keys (`decoder.decoder.layers.0.cross_attn...`,
`decoder.dec_bbox_head.2.layers.2...`), so official checkpoints load strictly by name.
Only the settings the RT-DETRv4 configs use are implemented: layer_scale 1 (no wide layers),
'default' query selection and cross-attention, learn_query_content False, one input level per
feature map.
"""
import copy
import math
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn import init

from .box_ops import inverse_sigmoid
from .denoising import contrastive_denoising_group
from .fdr import distance2bbox, integral, weighting_function

_ACTIVATIONS = {"relu": nn.ReLU, "silu": nn.SiLU, "gelu": nn.GELU}


def build_activation(name: str) -> nn.Module:
    if name.lower() not in _ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; expected one of {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[name.lower()]()


def bias_init_with_prob(prior_prob: float) -> float:
    """Bias b with sigmoid(b) = prior_prob (focal-loss prior init)."""
    return float(-math.log((1 - prior_prob) / prior_prob))


class MLP(nn.Module):
    """`num_layers` Linear layers with an activation between them (keys `layers.{i}`)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int, act: str = "relu"):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.act = build_activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers[:-1]:
            x = self.act(layer(x))
        return self.layers[-1](x)


class MSDeformableAttention(nn.Module):
    """Multi-scale deformable attention with box references (Deformable DETR, D-FINE variant).

    No value or output projection. Each head samples num_points[l] points on level l with
    grid_sample; offsets are scaled by 1/num_points[l] * reference wh * offset_scale around the
    reference centre, and the weights are a softmax over all points of a head.
    """

    def __init__(self, embed_dim: int = 256, num_heads: int = 8, num_points: Sequence[int] = (3, 6, 3),
                 offset_scale: float = 0.5):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.num_points = list(num_points)
        self.offset_scale = offset_scale
        total = sum(self.num_points)
        scale = [1 / n for n in self.num_points for _ in range(n)]
        self.register_buffer("num_points_scale", torch.tensor(scale, dtype=torch.float32))
        self.sampling_offsets = nn.Linear(embed_dim, num_heads * total * 2)
        self.attention_weights = nn.Linear(embed_dim, num_heads * total)
        self._reset_parameters()

    def _reset_parameters(self):
        # Head h starts with its points on a ray at angle 2*pi*h/H, point k of a level at distance k.
        init.constant_(self.sampling_offsets.weight, 0)
        thetas = torch.arange(self.num_heads, dtype=torch.float32) * (2.0 * math.pi / self.num_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = grid / grid.abs().max(-1, keepdim=True).values
        grid = grid.reshape(self.num_heads, 1, 2).tile([1, sum(self.num_points), 1])
        grid *= torch.concat([torch.arange(1, n + 1) for n in self.num_points]).reshape(1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.flatten())
        init.constant_(self.attention_weights.weight, 0)
        init.constant_(self.attention_weights.bias, 0)

    def forward(self, query: torch.Tensor, reference_boxes: torch.Tensor, values: Sequence[torch.Tensor],
                spatial_shapes: Sequence[Tuple[int, int]]) -> torch.Tensor:
        """query [B, Q, D]; reference_boxes [B, Q, 1, 4] cxcywh in [0, 1]; values[l] [B, heads, D/heads, H_l*W_l]."""
        bs, num_q = query.shape[:2]
        total = sum(self.num_points)
        offsets = self.sampling_offsets(query).reshape(bs, num_q, self.num_heads, total, 2)
        weights = F.softmax(self.attention_weights(query).reshape(bs, num_q, self.num_heads, total), dim=-1)

        scale = self.num_points_scale.to(dtype=query.dtype).unsqueeze(-1)
        offsets = offsets * scale * reference_boxes[:, :, None, :, 2:] * self.offset_scale
        locations = reference_boxes[:, :, None, :, :2] + offsets  # [B, Q, heads, P, 2] in [0, 1]

        grids = (2 * locations - 1).permute(0, 2, 1, 3, 4).flatten(0, 1).split(self.num_points, dim=-2)
        sampled = []
        for value, grid, (h, w) in zip(values, grids, spatial_shapes):
            value = value.reshape(bs * self.num_heads, -1, h, w)
            sampled.append(F.grid_sample(value, grid, mode="bilinear", padding_mode="zeros", align_corners=False))
        weights = weights.permute(0, 2, 1, 3).reshape(bs * self.num_heads, 1, num_q, total)
        out = (torch.concat(sampled, dim=-1) * weights).sum(-1)  # [B*heads, D/heads, Q]
        return out.reshape(bs, -1, num_q).permute(0, 2, 1)


class Gate(nn.Module):
    """Fuses the residual x1 and the cross-attention output x2 with sigmoid gates, then LayerNorm."""

    def __init__(self, d_model: int):
        super().__init__()
        self.gate = nn.Linear(2 * d_model, 2 * d_model)
        init.constant_(self.gate.bias, bias_init_with_prob(0.5))
        init.constant_(self.gate.weight, 0)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        g1, g2 = torch.sigmoid(self.gate(torch.cat([x1, x2], dim=-1))).chunk(2, dim=-1)
        return self.norm(g1 * x1 + g2 * x2)


class DecoderLayer(nn.Module):
    """Self-attention (post-norm), deformable cross-attention + gate, FFN (post-norm)."""

    def __init__(self, d_model: int = 256, n_head: int = 8, dim_feedforward: int = 1024, dropout: float = 0.0,
                 activation: str = "silu", num_points: Sequence[int] = (3, 6, 3)):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, n_head, dropout=dropout, batch_first=True)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.cross_attn = MSDeformableAttention(d_model, n_head, num_points)
        self.dropout2 = nn.Dropout(dropout)
        self.gateway = Gate(d_model)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.activation = build_activation(activation)
        self.dropout3 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.dropout4 = nn.Dropout(dropout)
        self.norm3 = nn.LayerNorm(d_model)
        init.xavier_uniform_(self.linear1.weight)
        init.xavier_uniform_(self.linear2.weight)

    def forward(self, target, reference_boxes, values, spatial_shapes, attn_mask=None, query_pos=None):
        q = k = target + query_pos
        target = self.norm1(target + self.dropout1(self.self_attn(q, k, value=target, attn_mask=attn_mask)[0]))
        cross = self.cross_attn(target + query_pos, reference_boxes, values, spatial_shapes)
        target = self.gateway(target, self.dropout2(cross))
        ffn = self.linear2(self.dropout3(self.activation(self.linear1(target))))
        # The clamp keeps fp16 finite before the norm (official).
        return self.norm3((target + self.dropout4(ffn)).clamp(min=-65504, max=65504))


class LQE(nn.Module):
    """Location Quality Estimator: top-k probabilities (+ their mean) of each edge distribution -> MLP,
    added to the class logits (D-FINE Sec. 3.1)."""

    def __init__(self, k: int = 4, hidden_dim: int = 64, num_layers: int = 2, reg_max: int = 32, act: str = "silu"):
        super().__init__()
        self.k = k
        self.reg_max = reg_max
        self.reg_conf = MLP(4 * (k + 1), hidden_dim, 1, num_layers, act=act)
        init.constant_(self.reg_conf.layers[-1].bias, 0)
        init.constant_(self.reg_conf.layers[-1].weight, 0)

    def forward(self, scores: torch.Tensor, corners: torch.Tensor) -> torch.Tensor:
        b, q, _ = corners.shape
        prob = F.softmax(corners.reshape(b, q, 4, self.reg_max + 1), dim=-1)
        top = prob.topk(self.k, dim=-1).values
        stat = torch.cat([top, top.mean(dim=-1, keepdim=True)], dim=-1)
        return scores + self.reg_conf(stat.reshape(b, q, -1))


class DecoderStack(nn.Module):
    """The decoder layers and their LQEs (state-dict prefix `decoder.decoder.`).

    `up` and `reg_scale` are the parent's Parameters registered a second time, because the official
    state dict stores them under both `decoder.` and `decoder.decoder.`.
    """

    def __init__(self, layer: DecoderLayer, num_layers: int, up: nn.Parameter, reg_scale: nn.Parameter,
                 reg_max: int, act: str):
        super().__init__()
        self.up, self.reg_scale = up, reg_scale
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))
        self.lqe_layers = nn.ModuleList(LQE(4, 64, 2, reg_max, act=act) for _ in range(num_layers))


class DFINEDecoder(nn.Module):
    """RT-DETRv4 / D-FINE decoder (official DFINETransformer) for RT-DETRv4's settings.

    forward(feats, targets=None): feats are the encoder's maps [B, C_l, H_l, W_l] at `feat_strides`.
    Eval: {"pred_logits" [B,Q,C], "pred_boxes" [B,Q,4] cxcywh} of layer `eval_idx` (later layers are
    skipped). Training: the official D-FINE dict (pred_logits, pred_boxes, pred_corners, ref_points, up,
    reg_scale, aux_outputs, pre_outputs, enc_aux_outputs, enc_meta, and with targets dn_outputs,
    dn_pre_outputs, dn_meta).
    """

    def __init__(
        self,
        num_classes: int = 80,
        hidden_dim: int = 256,
        num_queries: int = 300,
        feat_channels: Sequence[int] = (256, 256, 256),
        feat_strides: Sequence[int] = (8, 16, 32),
        num_levels: int = 3,
        num_points: Sequence[int] = (3, 6, 3),
        nhead: int = 8,
        num_layers: int = 6,
        dim_feedforward: int = 1024,
        dropout: float = 0.0,
        activation: str = "silu",
        mlp_act: str = "silu",
        num_denoising: int = 100,
        label_noise_ratio: float = 0.5,
        box_noise_scale: float = 1.0,
        eval_spatial_size: Optional[Tuple[int, int]] = (640, 640),
        eval_idx: int = -1,
        eps: float = 1e-2,
        reg_max: int = 32,
        reg_scale: float = 4,
    ):
        super().__init__()
        if not (len(feat_channels) == len(feat_strides) == num_levels == len(num_points)):
            raise ValueError(f"feat_channels {feat_channels}, feat_strides {feat_strides} and num_points "
                             f"{num_points} must each have num_levels={num_levels} entries")
        self.hidden_dim = hidden_dim
        self.num_classes = num_classes
        self.num_queries = num_queries
        self.feat_strides = list(feat_strides)
        self.num_levels = num_levels
        self.nhead = nhead
        self.num_layers = num_layers
        self.eval_idx = eval_idx if eval_idx >= 0 else num_layers + eval_idx
        self.eps = eps
        self.reg_max = reg_max
        self.num_denoising = num_denoising
        self.label_noise_ratio = label_noise_ratio
        self.box_noise_scale = box_noise_scale
        self.eval_spatial_size = tuple(eval_spatial_size) if eval_spatial_size else None

        self.input_proj = nn.ModuleList(
            nn.Identity() if c == hidden_dim else nn.Sequential(OrderedDict([
                ("conv", nn.Conv2d(c, hidden_dim, 1, bias=False)), ("norm", nn.BatchNorm2d(hidden_dim))]))
            for c in feat_channels)

        # FDR constants. An int reg_scale gives an int64 Parameter, exactly as the official configs do.
        self.up = nn.Parameter(torch.tensor([0.5]), requires_grad=False)
        self.reg_scale = nn.Parameter(torch.tensor([reg_scale]), requires_grad=False)
        layer = DecoderLayer(hidden_dim, nhead, dim_feedforward, dropout, activation, num_points)
        self.decoder = DecoderStack(layer, num_layers, self.up, self.reg_scale, reg_max, activation)

        if num_denoising > 0:
            self.denoising_class_embed = nn.Embedding(num_classes + 1, hidden_dim, padding_idx=num_classes)
            init.normal_(self.denoising_class_embed.weight[:-1])
        self.query_pos_head = MLP(4, 2 * hidden_dim, hidden_dim, 2, act=mlp_act)

        self.enc_output = nn.Sequential(OrderedDict([
            ("proj", nn.Linear(hidden_dim, hidden_dim)), ("norm", nn.LayerNorm(hidden_dim))]))
        self.enc_score_head = nn.Linear(hidden_dim, num_classes)
        self.enc_bbox_head = MLP(hidden_dim, hidden_dim, 4, 3, act=mlp_act)

        self.dec_score_head = nn.ModuleList(nn.Linear(hidden_dim, num_classes) for _ in range(num_layers))
        self.pre_bbox_head = MLP(hidden_dim, hidden_dim, 4, 3, act=mlp_act)
        self.dec_bbox_head = nn.ModuleList(
            MLP(hidden_dim, hidden_dim, 4 * (reg_max + 1), 3, act=mlp_act) for _ in range(num_layers))

        self._anchor_cache: Dict[Tuple, Tuple[torch.Tensor, torch.Tensor]] = {}
        if self.eval_spatial_size:
            anchors, valid_mask = self._generate_anchors(self._eval_shapes())
            self.register_buffer("anchors", anchors)
            self.register_buffer("valid_mask", valid_mask)
        self._reset_parameters(feat_channels)

    def _reset_parameters(self, feat_channels: Sequence[int]):
        bias = bias_init_with_prob(0.01)
        init.constant_(self.enc_score_head.bias, bias)
        for head in (self.enc_bbox_head, self.pre_bbox_head, *self.dec_bbox_head):
            init.constant_(head.layers[-1].weight, 0)
            init.constant_(head.layers[-1].bias, 0)
        for cls_head in self.dec_score_head:
            init.constant_(cls_head.bias, bias)
        init.xavier_uniform_(self.enc_output.proj.weight)
        init.xavier_uniform_(self.query_pos_head.layers[0].weight)
        init.xavier_uniform_(self.query_pos_head.layers[1].weight)
        for proj, c in zip(self.input_proj, feat_channels):
            if c != self.hidden_dim:
                init.xavier_uniform_(proj.conv.weight)

    # ----------------------------------------------------------------------------------- anchors
    def _eval_shapes(self) -> List[Tuple[int, int]]:
        h, w = self.eval_spatial_size
        return [(int(h / s), int(w / s)) for s in self.feat_strides]

    def _generate_anchors(self, spatial_shapes, grid_size: float = 0.05, device=None):
        """Anchor boxes in logit space, one per position: centre of the cell, side 0.05 * 2^level.
        Anchors with any coordinate outside (eps, 1 - eps) are invalid: +inf, masked in `valid_mask`."""
        anchors = []
        for lvl, (h, w) in enumerate(spatial_shapes):
            grid_y, grid_x = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
            xy = (torch.stack([grid_x, grid_y], dim=-1).unsqueeze(0) + 0.5) / torch.tensor([w, h], dtype=torch.float32)
            wh = torch.ones_like(xy) * grid_size * (2.0**lvl)
            anchors.append(torch.concat([xy, wh], dim=-1).reshape(-1, h * w, 4))
        anchors = torch.concat(anchors, dim=1).to(device)
        valid_mask = ((anchors > self.eps) * (anchors < 1 - self.eps)).all(-1, keepdim=True)
        anchors = torch.log(anchors / (1 - anchors))
        return torch.where(valid_mask, anchors, torch.inf), valid_mask

    def _anchors_for(self, spatial_shapes, device) -> Tuple[torch.Tensor, torch.Tensor]:
        # The stored buffers hold eval_spatial_size only; other sizes (multi-scale training) are
        # generated once per (size, device) and cached instead of rebuilt on the host every step.
        if not self.training and self.eval_spatial_size and list(spatial_shapes) == self._eval_shapes():
            return self.anchors, self.valid_mask
        key = (tuple(spatial_shapes), str(device))
        if key not in self._anchor_cache:
            self._anchor_cache[key] = self._generate_anchors(spatial_shapes, device=device)
        return self._anchor_cache[key]

    # ------------------------------------------------------------------------------ main stages
    def _flatten_memory(self, feats: List[torch.Tensor]):
        if len(feats) != self.num_levels:
            raise ValueError(f"expected {self.num_levels} feature maps, got {len(feats)}")
        proj = [p(f) for p, f in zip(self.input_proj, feats)]
        spatial_shapes = [(f.shape[2], f.shape[3]) for f in proj]
        memory = torch.concat([f.flatten(2).permute(0, 2, 1) for f in proj], 1)
        return memory, spatial_shapes

    def _select_queries(self, memory, spatial_shapes):
        """Score every (valid) position, keep the top num_queries: RT-DETR query selection."""
        anchors, valid_mask = self._anchors_for(spatial_shapes, memory.device)
        if memory.shape[0] > 1:
            anchors = anchors.repeat(memory.shape[0], 1, 1)
        memory = valid_mask.to(memory.dtype) * memory
        enc_memory = self.enc_output(memory)
        enc_logits = self.enc_score_head(enc_memory)
        topk_ind = torch.topk(enc_logits.max(-1).values, self.num_queries, dim=-1).indices

        def gather(x):
            return x.gather(dim=1, index=topk_ind.unsqueeze(-1).repeat(1, 1, x.shape[-1]))

        topk_memory = gather(enc_memory)
        topk_boxes_unact = self.enc_bbox_head(topk_memory) + gather(anchors)
        enc_out = None
        if self.training:
            enc_out = {"pred_logits": gather(enc_logits), "pred_boxes": F.sigmoid(topk_boxes_unact)}
        return topk_memory.detach(), topk_boxes_unact.detach(), enc_out

    def _decode(self, target, ref_unact, memory, spatial_shapes, attn_mask=None):
        """Run the layers with FDR. Returns stacked per-layer (boxes, logits, corners, refs) over the
        layers that produce outputs (all in training, only eval_idx in eval) and the pre outputs."""
        values = memory.reshape(memory.shape[0], memory.shape[1], self.nhead, -1).permute(0, 2, 3, 1)
        values = values.split([h * w for h, w in spatial_shapes], dim=-1)
        if hasattr(self, "project"):  # deploy: constant W(n)
            project = self.project
        else:
            project = weighting_function(self.reg_max, self.up, self.reg_scale)

        boxes, logits, corners, refs = [], [], [], []
        pre_boxes = pre_logits = None
        output = target
        output_detach = corners_undetach = 0
        ref_detach = F.sigmoid(ref_unact)
        for i, layer in enumerate(self.decoder.layers):
            query_pos = self.query_pos_head(ref_detach).clamp(min=-10, max=10)
            output = layer(output, ref_detach.unsqueeze(2), values, spatial_shapes, attn_mask, query_pos)
            if i == 0:
                # First-layer "traditional" box; its detached version is the FDR reference of all layers.
                pre_boxes = F.sigmoid(self.pre_bbox_head(output) + inverse_sigmoid(ref_detach))
                if self.training:
                    pre_logits = self.dec_score_head[0](output)
                ref_initial = pre_boxes.detach()
            # Corners accumulate across layers: each layer refines the previous layer's distribution.
            pred_corners = self.dec_bbox_head[i](output + output_detach) + corners_undetach
            box = distance2bbox(ref_initial, integral(pred_corners, project, self.reg_max), self.reg_scale)
            if self.training or i == self.eval_idx:
                scores = self.decoder.lqe_layers[i](self.dec_score_head[i](output), pred_corners)
                logits.append(scores)
                boxes.append(box)
                corners.append(pred_corners)
                refs.append(ref_initial)
                if not self.training:
                    break
            corners_undetach = pred_corners
            ref_detach = box.detach()
            output_detach = output.detach()
        return (torch.stack(boxes), torch.stack(logits), torch.stack(corners), torch.stack(refs),
                pre_boxes, pre_logits)

    def forward(self, feats: List[torch.Tensor], targets: Optional[List[Dict[str, torch.Tensor]]] = None) -> Dict:
        memory, spatial_shapes = self._flatten_memory(feats)
        dn = None
        if self.training and self.num_denoising > 0 and targets is not None:
            dn = contrastive_denoising_group(targets, self.num_classes, self.num_queries, self.denoising_class_embed,
                                             self.num_denoising, self.label_noise_ratio, self.box_noise_scale)
        content, ref_unact, enc_out = self._select_queries(memory, spatial_shapes)
        attn_mask = dn_meta = None
        if dn is not None:
            dn_content, dn_ref_unact, attn_mask, dn_meta = dn
            content = torch.concat([dn_content, content], dim=1)
            ref_unact = torch.concat([dn_ref_unact, ref_unact], dim=1)

        boxes, logits, corners, refs, pre_boxes, pre_logits = self._decode(
            content, ref_unact, memory, spatial_shapes, attn_mask)
        if not self.training:
            return {"pred_logits": logits[-1], "pred_boxes": boxes[-1]}

        if dn_meta is not None:
            split = dn_meta["dn_num_split"]
            dn_pre_logits, pre_logits = torch.split(pre_logits, split, dim=1)
            dn_pre_boxes, pre_boxes = torch.split(pre_boxes, split, dim=1)
            dn_logits, logits = torch.split(logits, split, dim=2)
            dn_boxes, boxes = torch.split(boxes, split, dim=2)
            dn_corners, corners = torch.split(corners, split, dim=2)
            dn_refs, refs = torch.split(refs, split, dim=2)

        out = {"pred_logits": logits[-1], "pred_boxes": boxes[-1], "pred_corners": corners[-1],
               "ref_points": refs[-1], "up": self.up, "reg_scale": self.reg_scale,
               "aux_outputs": _layer_outputs(logits[:-1], boxes[:-1], corners[:-1], refs[:-1], corners[-1], logits[-1]),
               "enc_aux_outputs": [enc_out],
               "pre_outputs": {"pred_logits": pre_logits, "pred_boxes": pre_boxes},
               "enc_meta": {"class_agnostic": False}}
        if dn_meta is not None:
            out["dn_outputs"] = _layer_outputs(dn_logits, dn_boxes, dn_corners, dn_refs, dn_corners[-1], dn_logits[-1])
            out["dn_pre_outputs"] = {"pred_logits": dn_pre_logits, "pred_boxes": dn_pre_boxes}
            out["dn_meta"] = dn_meta
        return out

    # ----------------------------------------------------------------------------------- deploy
    def convert_to_deploy(self) -> "DFINEDecoder":
        """Official deploy conversion: drop layers after eval_idx, keep only the eval layer's LQE and
        score head (others become Identity, so the state dict matches the official deployed one),
        and precompute W(n) as a constant (non-persistent buffer). Eval outputs are unchanged."""
        if hasattr(self, "project"):
            return self
        self.eval()
        keep = self.eval_idx
        self.register_buffer("project", weighting_function(self.reg_max, self.up, self.reg_scale, deploy=True),
                             persistent=False)
        self.decoder.layers = self.decoder.layers[: keep + 1]
        self.decoder.lqe_layers = nn.ModuleList([nn.Identity()] * keep + [self.decoder.lqe_layers[keep]])
        self.dec_score_head = nn.ModuleList([nn.Identity()] * keep + [self.dec_score_head[keep]])
        self.dec_bbox_head = nn.ModuleList(self.dec_bbox_head[i] if i <= keep else nn.Identity()
                                           for i in range(len(self.dec_bbox_head)))
        return self


def _layer_outputs(logits, boxes, corners, refs, teacher_corners, teacher_logits) -> List[Dict[str, torch.Tensor]]:
    """Per-layer dicts for the aux / dn losses; the last layer is the DDF (self-distillation) teacher."""
    return [{"pred_logits": a, "pred_boxes": b, "pred_corners": c, "ref_points": d,
             "teacher_corners": teacher_corners, "teacher_logits": teacher_logits}
            for a, b, c, d in zip(logits, boxes, corners, refs)]
