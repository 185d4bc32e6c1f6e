"""Criterion on the real RT-DETRv4-S training outputs: every official term present, gradients reach the model."""
import torch

from detector import build_detector
from detector.criterion import Criterion


def test_criterion_on_model_outputs_trains_every_head():
    torch.manual_seed(0)
    model = build_detector("s", num_classes=5, num_queries=30, num_denoising=10).train()
    # The official init zeroes the box heads, so at step 0 every layer predicts the same corners and
    # DDF is (officially) skipped; perturb them to stand for a model that has trained a little.
    with torch.no_grad():
        for head in model.decoder.dec_bbox_head:
            head.layers[-1].weight.normal_(0, 0.01)
    images = torch.rand(2, 3, 160, 160)
    targets = [{"labels": torch.tensor([1, 4]), "boxes": torch.tensor([[0.3, 0.4, 0.2, 0.3], [0.7, 0.6, 0.3, 0.2]])},
               {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}]
    losses = Criterion(num_classes=5)(model(images, targets), targets)

    layers = model.cfg.num_decoder_layers
    expected = {"loss_mal", "loss_bbox", "loss_giou", "loss_fgl"}
    for i in range(layers - 1):
        expected |= {f"loss_{t}_aux_{i}" for t in ("mal", "bbox", "giou", "fgl", "ddf")}
    for i in range(layers):
        expected |= {f"loss_{t}_dn_{i}" for t in ("mal", "bbox", "giou", "fgl")}
        expected |= {f"loss_ddf_dn_{i}"} if i < layers - 1 else set()
    for s in ("_pre", "_enc_0", "_dn_pre"):
        expected |= {f"loss_{t}{s}" for t in ("mal", "bbox", "giou")}
    assert set(losses) == expected
    assert all(torch.isfinite(v) for v in losses.values())

    sum(losses.values()).backward()
    decoder = model.decoder
    for head in [decoder.enc_score_head, decoder.pre_bbox_head, *decoder.dec_score_head, *decoder.dec_bbox_head]:
        grads = [p.grad for p in head.parameters()]
        assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0
