"""Criterion: parity with the official RTv4Criterion, gradients, empty batches, a tiny overfit."""
import os
import tempfile
from pathlib import Path

import pytest
import torch

from detector.criterion import DEFAULT_WEIGHTS, Criterion, union_indices
from detector.fdr import distance2bbox, integral, weighting_function

# Produced by running the official DFINETransformer (S settings, 3 layers, 24 queries, 8 classes,
# random perturbed weights, train mode with denoising) and the official RTv4Criterion with losses
# ['mal', 'boxes', 'local'] on the same outputs; also 30 random uni-set cases from the official
# _get_go_indices. See the criterion section of the README for how it was made.
PARITY = Path(__file__).resolve().parents[1] / "fixtures" / "criterion_parity.pt"


@pytest.fixture(scope="module")
def parity():
    return torch.load(PARITY, weights_only=False)


@pytest.mark.parametrize("case", ["mixed", "empty"])
def test_matches_official_losses(parity, case):
    data = parity["cases"][case]
    keys_before = {k: sorted(v) for k, v in _dicts(data["outputs"])}
    ours = Criterion(num_classes=parity["num_classes"])(data["outputs"], data["targets"])
    ref = data["losses"]
    assert list(ours) == list(ref)  # same key names, same order
    for k, v in ref.items():
        assert ours[k].item() == pytest.approx(v, rel=1e-5, abs=1e-5), k
    assert {k: sorted(v) for k, v in _dicts(data["outputs"])} == keys_before  # outputs not mutated


@pytest.mark.gpu
def test_matches_official_losses_on_cuda(parity):
    data = parity["cases"]["mixed"]
    to = lambda x: _map(x, lambda t: t.cuda())  # noqa: E731
    ours = Criterion(num_classes=parity["num_classes"])(to(data["outputs"]), to(data["targets"]))
    for k, v in data["losses"].items():
        assert ours[k].device.type == "cuda"
        assert ours[k].item() == pytest.approx(v, rel=1e-5, abs=1e-5), k


def test_mixed_case_covers_every_term(parity):
    keys = set(parity["cases"]["mixed"]["losses"])
    for suffix in ["", "_aux_0", "_aux_1", "_pre", "_enc_0", "_dn_0", "_dn_1", "_dn_2", "_dn_pre"]:
        assert {"loss_mal" + suffix, "loss_bbox" + suffix, "loss_giou" + suffix} <= keys
    assert {"loss_fgl", "loss_ddf_aux_0", "loss_ddf_aux_1", "loss_fgl_dn_2", "loss_ddf_dn_1"} <= keys
    assert "loss_ddf" not in keys and "loss_ddf_dn_2" not in keys  # the last layer is its own teacher


def test_union_set_matches_official(parity):
    for case in parity["go_cases"]:
        lists = [[(torch.tensor(a, dtype=torch.int64), torch.tensor(b, dtype=torch.int64)) for a, b in per_layer]
                 for per_layer in case["lists"]]
        got = [(r.tolist(), c.tolist()) for r, c in union_indices(lists)]
        assert got == [(list(r), list(c)) for r, c in case["go"]]


def test_union_set_keeps_most_frequent_pair():
    t = lambda *x: torch.tensor(x, dtype=torch.int64)  # noqa: E731
    layers = [[(t(0, 1), t(0, 1))], [(t(0, 1), t(1, 0))], [(t(0, 2), t(0, 1))], [(t(1), t(1))]]
    (rows, cols), = union_indices(layers)
    assert dict(zip(rows.tolist(), cols.tolist())) == {0: 0, 1: 1, 2: 1}


# ------------------------------------------------------------------------------- synthetic outputs
def _targets(counts, num_classes, gen):
    out = []
    for n in counts:
        cxcy = torch.rand(n, 2, generator=gen) * 0.6 + 0.2
        wh = torch.rand(n, 2, generator=gen) * 0.3 + 0.1
        out.append({"labels": torch.randint(0, num_classes, (n,), generator=gen), "boxes": torch.cat([cxcy, wh], 1)})
    return out


def _rand_boxes(*shape, gen):
    return torch.cat([torch.rand(*shape, 2, generator=gen) * 0.6 + 0.2, torch.rand(*shape, 2, generator=gen) * 0.3 + 0.05], -1)


def _synthetic(targets, num_classes, queries=12, layers=3, dn_groups=2, gen=None):
    """A D-FINE training dict built from leaf tensors (returned too, to check their gradients)."""
    B, reg = len(targets), 33
    leaves = {}

    def leaf(name, t):
        leaves[name] = t.requires_grad_()
        return t

    def head(prefix, q):
        logits = [leaf(f"{prefix}logits{i}", torch.randn(B, q, num_classes, generator=gen)) for i in range(layers)]
        boxes = [leaf(f"{prefix}boxes{i}", _rand_boxes(B, q, gen=gen)) for i in range(layers)]
        corners = [leaf(f"{prefix}corners{i}", torch.randn(B, q, 4 * reg, generator=gen)) for i in range(layers)]
        ref = _rand_boxes(B, q, gen=gen)
        layer = [{"pred_logits": lg, "pred_boxes": bx, "pred_corners": cr, "ref_points": ref,
                  "teacher_corners": corners[-1], "teacher_logits": logits[-1]}
                 for lg, bx, cr in zip(logits, boxes, corners)]
        pre = {"pred_logits": leaf(f"{prefix}pre_logits", torch.randn(B, q, num_classes, generator=gen)),
               "pred_boxes": leaf(f"{prefix}pre_boxes", _rand_boxes(B, q, gen=gen))}
        return layer, pre

    layer, pre = head("", queries)
    out = {k: layer[-1][k] for k in ("pred_logits", "pred_boxes", "pred_corners", "ref_points")}
    out.update(up=torch.tensor([0.5]), reg_scale=torch.tensor([4.0]), aux_outputs=layer[:-1], pre_outputs=pre,
               enc_aux_outputs=[{"pred_logits": leaf("enc_logits", torch.randn(B, queries, num_classes, generator=gen)),
                                 "pred_boxes": leaf("enc_boxes", _rand_boxes(B, queries, gen=gen))}],
               enc_meta={"class_agnostic": False})
    counts = [len(t["labels"]) for t in targets]
    if max(counts) > 0:
        m = max(counts)
        dn_layer, dn_pre = head("dn_", 2 * m * dn_groups)
        out.update(dn_outputs=dn_layer, dn_pre_outputs=dn_pre, dn_meta={
            "dn_num_group": dn_groups, "dn_num_split": [2 * m * dn_groups, queries],
            "dn_positive_idx": [torch.cat([g * 2 * m + torch.arange(n) for g in range(dn_groups)]) for n in counts]})
    return out, leaves


def test_gradients_reach_every_prediction():
    gen = torch.Generator().manual_seed(0)
    targets = _targets([3, 0, 2], 5, gen)
    outputs, leaves = _synthetic(targets, 5, gen=gen)
    losses = Criterion(num_classes=5)(outputs, targets)
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    for name, t in leaves.items():
        assert t.grad is not None and t.grad.abs().sum() > 0, name


def test_no_boxes_at_all_gives_finite_losses():
    gen = torch.Generator().manual_seed(1)
    targets = _targets([0, 0], 4, gen)
    outputs, leaves = _synthetic(targets, 4, gen=gen)
    losses = Criterion(num_classes=4)(outputs, targets)
    assert "dn_outputs" not in outputs and not any("_dn" in k for k in losses)
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_bbox"] == 0 and losses["loss_fgl"] == 0 and losses["loss_mal"] > 0
    sum(losses.values()).backward()
    assert leaves["logits2"].grad.abs().sum() > 0  # the background still trains the classifier


def test_weights_scale_the_terms():
    gen = torch.Generator().manual_seed(2)
    targets = _targets([2, 1], 3, gen)
    outputs, _ = _synthetic(targets, 3, gen=gen)
    base = Criterion(num_classes=3)(outputs, targets)
    doubled = Criterion(num_classes=3, weight_dict={k: 2 * v for k, v in DEFAULT_WEIGHTS.items()})(outputs, targets)
    assert list(base) == list(doubled)
    for k in base:
        assert doubled[k].item() == pytest.approx(2 * base[k].item(), rel=1e-6)
    no_fgl = Criterion(num_classes=3, weight_dict={k: v for k, v in DEFAULT_WEIGHTS.items() if k != "loss_fgl"})
    assert not any(k.startswith("loss_fgl") for k in no_fgl(outputs, targets))


def test_bad_labels_and_class_count_are_reported():
    gen = torch.Generator().manual_seed(3)
    targets = _targets([2], 3, gen)
    outputs, _ = _synthetic(targets, 3, gen=gen)
    targets[0]["labels"] = torch.tensor([0, 3])
    with pytest.raises(ValueError, match="outside 0..2"):
        Criterion(num_classes=3)(outputs, targets)
    with pytest.raises(ValueError, match="num_classes=4"):
        Criterion(num_classes=4)(outputs, _targets([2], 3, gen))


def test_num_boxes_is_averaged_over_a_process_group():
    """With torch.distributed initialised (gloo, world size 1) the all-reduce path gives the same numbers."""
    gen = torch.Generator().manual_seed(4)
    targets = _targets([2, 1], 3, gen)
    outputs, _ = _synthetic(targets, 3, gen=gen)
    plain = Criterion(num_classes=3)(outputs, targets)
    with tempfile.TemporaryDirectory() as tmp:
        torch.distributed.init_process_group("gloo", init_method=f"file://{os.path.join(tmp, 'pg')}", rank=0, world_size=1)
        try:
            reduced = Criterion(num_classes=3)(outputs, targets)
        finally:
            torch.distributed.destroy_process_group()
    assert {k: v.item() for k, v in plain.items()} == {k: v.item() for k, v in reduced.items()}


@pytest.fixture
def one_thread():
    """Tiny tensors: intra-op threads only add contention on the shared 2-core CI machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_tiny_overfit_fits_the_boxes(one_thread):
    """Free logits and corner distributions (boxes decoded by FDR around fixed references) fit 2 images."""
    gen = torch.Generator().manual_seed(5)
    C, Q, L = 3, 10, 2
    targets = _targets([2, 1], C, gen)
    ref = _rand_boxes(2, Q, gen=gen)
    up, reg_scale = torch.tensor([0.5]), torch.tensor([4.0])
    project = weighting_function(32, up, reg_scale)
    logits = [torch.randn(2, Q, C, generator=gen).requires_grad_() for _ in range(L)]
    corners = [(0.1 * torch.randn(2, Q, 4 * 33, generator=gen)).requires_grad_() for _ in range(L)]
    opt = torch.optim.Adam(logits + corners, lr=0.05)
    criterion = Criterion(num_classes=C)

    def outputs():
        layers = [{"pred_logits": lg, "pred_boxes": distance2bbox(ref, integral(cr, project, 32), reg_scale),
                   "pred_corners": cr, "ref_points": ref, "teacher_corners": corners[-1], "teacher_logits": logits[-1]}
                  for lg, cr in zip(logits, corners)]
        return {**layers[-1], "up": up, "reg_scale": reg_scale, "aux_outputs": layers[:-1]}

    first = None
    for _ in range(100):
        losses = criterion(outputs(), targets)
        total = sum(losses.values())
        first = first if first is not None else {k: v.item() for k, v in losses.items()}
        opt.zero_grad()
        total.backward()
        opt.step()
    with torch.no_grad():
        out = outputs()
        final = criterion(out, targets)
    assert final["loss_giou"] < 0.1 * first["loss_giou"] and final["loss_bbox"] < 0.1 * first["loss_bbox"]
    assert final["loss_mal"] < first["loss_mal"]
    scores = out["pred_logits"].sigmoid()
    for b, t in enumerate(targets):  # the best-scoring query of each GT class sits on that GT
        for label, box in zip(t["labels"], t["boxes"]):
            q = scores[b, :, label].argmax()
            assert (out["pred_boxes"][b, q] - box).abs().max() < 0.05


def _dicts(tree, path="outputs"):
    """(path, keys) of every dict in a nested output structure."""
    if isinstance(tree, dict):
        yield path, list(tree)
        for k, v in tree.items():
            yield from _dicts(v, f"{path}.{k}")
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            yield from _dicts(v, f"{path}[{i}]")


def _map(tree, fn):
    """Apply fn to every tensor of a nested dict/list structure."""
    if isinstance(tree, torch.Tensor):
        return fn(tree)
    if isinstance(tree, dict):
        return {k: _map(v, fn) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_map(v, fn) for v in tree)
    return tree


def test_class_agnostic_encoder_proposals():
    gen = torch.Generator().manual_seed(6)
    targets = _targets([2, 1], 3, gen)
    outputs, leaves = _synthetic(targets, 3, gen=gen)
    enc_logits = torch.randn(2, 12, 1, generator=gen).requires_grad_()
    outputs["enc_aux_outputs"][0]["pred_logits"] = enc_logits
    outputs["enc_meta"] = {"class_agnostic": True}
    losses = Criterion(num_classes=3)(outputs, targets)
    assert torch.isfinite(losses["loss_mal_enc_0"])
    losses["loss_mal_enc_0"].backward()
    assert enc_logits.grad.abs().sum() > 0
