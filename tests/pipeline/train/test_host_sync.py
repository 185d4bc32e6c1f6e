"""Host-sync counting on the CPU, and the sync budget of our criterion / denoising hot path."""
import numpy as np
import torch

from detector import build_detector
from detector.criterion import Criterion
from detector.denoising import contrastive_denoising_group
from pipeline.train.host_sync import count_host_syncs


def test_counts_calls_that_would_sync_and_ignores_host_bookkeeping():
    x = torch.rand(5)
    with count_host_syncs(x) as n:
        y = x * 2
        y.sum().item()                 # 1
        bool((y > 0).any())            # 2
        y[y > 1]                       # 3 (boolean mask)
        torch.nonzero(y)               # 4
        y.cpu().numpy()                # 5 (.cpu() counted; the host copy's .numpy() is not)
        host = torch.as_tensor(np.arange(3))   # built from numpy: host data, no sync
        host.tolist(), host.sum().item()
    assert n.total == 5, n


def test_criterion_and_denoising_sync_once_per_step():
    torch.manual_seed(0)
    model = build_detector("s", num_classes=5, num_queries=30, num_denoising=10).train()
    with torch.no_grad():
        for head in model.decoder.dec_bbox_head:
            head.layers[-1].weight.normal_(0, 0.01)
    images = torch.rand(2, 3, 96, 96)
    targets = [{"labels": torch.tensor([1, 4]), "boxes": torch.tensor([[0.3, 0.4, 0.2, 0.3], [0.7, 0.6, 0.3, 0.2]])},
               {"labels": torch.tensor([2]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}]
    with count_host_syncs(model) as n:
        outputs = model(images, targets)
        losses = Criterion(num_classes=5, check_labels=False)(outputs, targets)
        sum(losses.values()).backward()
    # the one sync: all layers' matching costs copied to the host at once for scipy's Hungarian solver
    assert n.total == 1 and list(n.where) == [next(k for k in n.where if "matcher.py" in k)], n
    assert any(k.startswith("loss_ddf_aux") for k in losses)


def test_denoising_positive_indices_match_nonzero():
    embed = torch.nn.Embedding(6, 8)
    targets = [{"labels": torch.tensor([1, 2, 3]), "boxes": torch.rand(3, 4) * 0.5 + 0.25},
               {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)},
               {"labels": torch.tensor([4]), "boxes": torch.rand(1, 4) * 0.5 + 0.25}]
    with count_host_syncs(embed) as n:
        _, _, _, meta = contrastive_denoising_group(targets, 5, 30, embed, num_denoising=10)
    assert n.total == 0, n
    g, m = meta["dn_num_group"], 3
    real = torch.zeros(3, m, dtype=torch.bool)
    for i, t in enumerate(targets):
        real[i, :len(t["labels"])] = True
    positive = torch.cat([real, torch.zeros_like(real)], 1).tile(1, g)
    want = torch.nonzero(positive)[:, 1].split([len(t["labels"]) * g for t in targets])
    assert [p.tolist() for p in meta["dn_positive_idx"]] == [w.tolist() for w in want]


def test_match_many_equals_layer_by_layer_with_one_copy():
    from detector.matcher import HungarianMatcher
    g = torch.Generator().manual_seed(1)
    targets = [{"labels": torch.tensor([0, 2]), "boxes": torch.rand(2, 4, generator=g) * 0.5 + 0.25},
               {"labels": torch.tensor([1]), "boxes": torch.rand(1, 4, generator=g) * 0.5 + 0.25}]
    layers = [{"pred_logits": torch.randn(2, q, 3, generator=g), "pred_boxes": torch.rand(2, q, 4, generator=g)}
              for q in (6, 6, 9)]   # one layer with another query count
    m = HungarianMatcher()
    with count_host_syncs(layers) as n:
        many = m.match_many(layers, [targets] * 3)
    assert n.total == 1
    for got, layer in zip(many, layers):
        assert [(r.tolist(), c.tolist()) for r, c in got] == [(r.tolist(), c.tolist()) for r, c in m(layer, targets)]
