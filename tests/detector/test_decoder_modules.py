"""DFINEDecoder behaviour: output structure in eval/train/denoising, deploy conversion, anchors for other
sizes, official init, gradient flow, and the contrastive denoising queries."""
import pytest
import torch

from detector.box_ops import inverse_sigmoid
from detector.denoising import contrastive_denoising_group, denoising_attn_mask
from detector.dfine_decoder import DFINEDecoder, bias_init_with_prob

SMALL = dict(num_classes=5, hidden_dim=64, nhead=8, dim_feedforward=128, num_queries=10, num_layers=3,
             num_denoising=12, feat_channels=(64, 64, 64), eval_spatial_size=(128, 128))


def make_inputs(batch=2, size=128, channels=64):
    feats = [torch.randn(batch, channels, size // s, size // s) for s in (8, 16, 32)]
    targets = [{"labels": torch.tensor([0, 4, 2]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.5, 0.3, 0.4],
                                                                           [0.5, 0.5, 0.8, 0.8]])},
               {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.4, 0.1, 0.3]])}][:batch]
    return feats, targets


def test_eval_returns_eval_layer_only():
    model = DFINEDecoder(**SMALL).eval()
    feats, _ = make_inputs()
    out = model(feats)
    assert set(out) == {"pred_logits", "pred_boxes"}
    assert out["pred_logits"].shape == (2, 10, 5) and out["pred_boxes"].shape == (2, 10, 4)


def test_train_outputs_without_targets():
    model = DFINEDecoder(**SMALL).train()
    feats, _ = make_inputs()
    out = model(feats)
    assert "dn_outputs" not in out and "dn_meta" not in out
    assert out["pred_corners"].shape == (2, 10, 4 * 33) and out["ref_points"].shape == (2, 10, 4)
    assert out["up"].item() == 0.5 and out["reg_scale"].dtype == torch.int64 and out["reg_scale"].item() == 4
    assert len(out["aux_outputs"]) == 2 and len(out["enc_aux_outputs"]) == 1
    assert out["enc_aux_outputs"][0]["pred_logits"].shape == (2, 10, 5)
    assert out["pre_outputs"]["pred_boxes"].shape == (2, 10, 4)
    for aux in out["aux_outputs"]:
        assert torch.equal(aux["teacher_corners"], out["pred_corners"])
        assert torch.equal(aux["teacher_logits"], out["pred_logits"])
    assert out["enc_meta"] == {"class_agnostic": False}


def test_train_outputs_with_denoising():
    model = DFINEDecoder(**SMALL).train()
    feats, targets = make_inputs()
    out = model(feats, targets)
    meta = out["dn_meta"]
    groups = 12 // 3  # num_denoising // max boxes per image
    assert meta["dn_num_group"] == groups and meta["dn_num_split"] == [2 * 3 * groups, 10]
    # Positives are the first max_gt slots of each 2*max_gt group, for real boxes only.
    assert meta["dn_positive_idx"][0].tolist() == [g * 6 + i for g in range(groups) for i in range(3)]
    assert meta["dn_positive_idx"][1].tolist() == [g * 6 for g in range(groups)]
    assert len(out["dn_outputs"]) == 3
    assert out["dn_outputs"][0]["pred_logits"].shape == (2, 24, 5)
    assert out["dn_outputs"][-1]["teacher_corners"].shape == (2, 24, 132)
    assert out["dn_pre_outputs"]["pred_boxes"].shape == (2, 24, 4)
    assert out["pred_logits"].shape == (2, 10, 5)  # matching queries only


def test_deploy_keeps_eval_outputs_and_official_keys():
    model = DFINEDecoder(**SMALL).eval()
    with torch.no_grad():  # non-zero box heads so that FDR matters
        for head in model.dec_bbox_head:
            head.layers[-1].weight.normal_(0, 0.05)
    feats, _ = make_inputs()
    with torch.no_grad():
        before = model(feats)
        model.convert_to_deploy()
        after = model(feats)
    for key in before:  # W(n) is recomputed in float64 in deploy mode, as in the official code
        torch.testing.assert_close(after[key], before[key], atol=1e-4, rtol=0)
    keys = model.state_dict().keys()
    assert not any(k.startswith(("decoder.lqe_layers.0.", "decoder.lqe_layers.1.", "dec_score_head.0.")) for k in keys)
    assert "decoder.lqe_layers.2.reg_conf.layers.0.weight" in keys and "dec_score_head.2.weight" in keys
    assert "project" not in keys and model.convert_to_deploy() is model


def test_eval_idx_stops_early_and_deploy_drops_later_layers():
    model = DFINEDecoder(**dict(SMALL, num_layers=4, eval_idx=1)).eval()
    feats, _ = make_inputs()
    with torch.no_grad():
        before = model(feats)
        model.decoder.layers[2].register_forward_hook(lambda *a: pytest.fail("layer after eval_idx ran"))
        model(feats)
        model.convert_to_deploy()
        torch.testing.assert_close(model(feats)["pred_logits"], before["pred_logits"], atol=1e-4, rtol=0)
    assert len(model.decoder.layers) == 2


def test_other_input_size_regenerates_anchors():
    model = DFINEDecoder(**SMALL).eval()
    assert model.anchors.shape == (1, 16 * 16 + 8 * 8 + 4 * 4, 4)
    feats, _ = make_inputs(size=192)
    assert model(feats)["pred_boxes"].shape == (2, 10, 4)
    ref = DFINEDecoder(**dict(SMALL, eval_spatial_size=(192, 192)))
    anchors, valid = model._anchors_for([(24, 24), (12, 12), (6, 6)], "cpu")
    assert torch.equal(anchors, ref.anchors) and torch.equal(valid, ref.valid_mask)
    # Anchors are logits of (centre, 0.05 * 2^level); the ones touching the border are +inf.
    assert torch.isinf(model.anchors[~model.valid_mask.squeeze(-1)]).all()
    torch.testing.assert_close(model.anchors[0, 17].sigmoid(), torch.tensor([1.5 / 16, 1.5 / 16, 0.05, 0.05]))


def test_official_initialisation():
    model = DFINEDecoder(**SMALL)
    prior = bias_init_with_prob(0.01)
    assert torch.allclose(model.enc_score_head.bias, torch.full((5,), prior))
    for head in model.dec_score_head:
        assert torch.allclose(head.bias, torch.full((5,), prior))
    for head in (model.enc_bbox_head, model.pre_bbox_head, *model.dec_bbox_head):
        assert not head.layers[-1].weight.any() and not head.layers[-1].bias.any()
    layer = model.decoder.layers[0]
    assert not layer.cross_attn.attention_weights.weight.any() and not layer.gateway.gate.weight.any()
    assert not layer.gateway.gate.bias.any()  # logit(0.5)
    assert not model.decoder.lqe_layers[0].reg_conf.layers[-1].weight.any()
    assert not model.denoising_class_embed.weight[-1].any()  # padding class
    # Head h's first sampling point starts on the ray at angle 2*pi*h/8, scaled to the unit square.
    offsets = layer.cross_attn.sampling_offsets.bias.view(8, 12, 2)
    assert offsets[0, 0].tolist() == [1.0, 0.0] and offsets[2, 0].tolist() == pytest.approx([0.0, 1.0], abs=1e-6)
    assert offsets[0, 2].tolist() == [3.0, 0.0] and offsets[0, 3].tolist() == [1.0, 0.0]  # level 1 restarts at 1
    assert model.decoder.up is model.up and model.decoder.reg_scale is model.reg_scale


def test_gradients_reach_every_trainable_parameter():
    model = DFINEDecoder(**dict(SMALL, feat_channels=(96, 96, 96))).train()  # with the conv+BN input_proj
    with torch.no_grad():  # the official init zeroes the heads, which would block some paths at step 0
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.02 * torch.randn_like(p))
    feats, targets = make_inputs(channels=96)
    out = model(feats, targets)
    loss = sum(t.float().mean() for t in _tensors(out))
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert missing == []
    assert not model.up.requires_grad and not model.reg_scale.requires_grad


def _tensors(out):
    for key, value in out.items():
        if key in ("up", "reg_scale", "dn_meta", "enc_meta"):
            continue
        if isinstance(value, dict):
            yield from _tensors(value)
        elif isinstance(value, list):
            for item in value:
                yield from _tensors(item)
        else:
            yield value


# ---------------------------------------------------------------------------------------- denoising
def test_attention_mask_blocks_other_groups():
    mask = denoising_attn_mask(max_gt=2, num_group=3, num_queries=5)
    assert mask.shape == (17, 17)
    group = torch.arange(12) // 4
    for i in range(17):
        for j in range(17):
            if i < 12 and j < 12:
                expected = bool(group[i] != group[j])
            else:
                expected = i >= 12 and j < 12  # matching queries never see denoising queries
            assert bool(mask[i, j]) == expected, (i, j)


def test_denoising_noise_is_bounded():
    """Positives move each edge by < half the box size, negatives by [1, 2) half sizes (before clipping)."""
    embed = torch.nn.Embedding(6, 8, padding_idx=5)
    box = torch.tensor([[0.5, 0.5, 0.2, 0.2]])
    targets = [{"labels": torch.tensor([3]), "boxes": box}]
    content, boxes_unact, _, meta = contrastive_denoising_group(targets, 5, 10, embed, num_denoising=200,
                                                                label_noise_ratio=0.5)
    boxes = boxes_unact.sigmoid()[0]
    assert boxes.shape == (400, 4) and meta["dn_num_group"] == 200
    xyxy = torch.cat([boxes[:, :2] - boxes[:, 2:] / 2, boxes[:, :2] + boxes[:, 2:] / 2], -1)
    shift = (xyxy - torch.tensor([0.4, 0.4, 0.6, 0.6])).abs() / 0.1  # in half-sizes
    assert (shift[0::2] < 1 + 1e-4).all()
    # A negative whose edges crossed is stored with |w|, |h| (official), i.e. with its edges swapped.
    crossed = (xyxy[:, [2, 3, 0, 1]] - torch.tensor([0.4, 0.4, 0.6, 0.6])).abs() / 0.1

    def in_band(s):
        return ((s > 1 - 1e-4) & (s < 2 + 1e-4)).view(-1, 2, 2).all(1)  # both edges of an axis

    assert (in_band(shift[1::2]) | in_band(crossed[1::2])).all()
    # A label flips with probability label_noise_ratio / 2, to a uniform class (possibly the same).
    changed = ~(content[0] == embed.weight[3]).all(-1)
    assert 0.1 < changed.float().mean() < 0.4


def test_denoising_padding_and_empty_batches():
    embed = torch.nn.Embedding(6, 8, padding_idx=5)
    targets = [{"labels": torch.tensor([1, 2]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]] * 2)},
               {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}]
    content, boxes_unact, mask, meta = contrastive_denoising_group(targets, 5, 10, embed, num_denoising=4)
    assert content.shape == (2, 8, 8) and mask.shape == (18, 18)
    assert not content[1].any()  # padded slots use the zero padding embedding
    torch.testing.assert_close(boxes_unact[1], inverse_sigmoid(torch.zeros(8, 4)))
    assert meta["dn_positive_idx"][1].numel() == 0
    empty = [{"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}]
    assert contrastive_denoising_group(empty, 5, 10, embed) is None
    assert contrastive_denoising_group(targets, 5, 10, embed, num_denoising=0) is None
