"""Batch-level transforms: official scales list, MixUp formula and targets (the step draws: test_plan.py)."""
import torch

from pipeline.data.collate import BatchRecord, apply_batch_record, multiscale_sizes


def _items(indices, epoch=5, size=32):
    g = torch.Generator().manual_seed(sum(indices))
    items = []
    for i in indices:
        n = i % 3 + 1
        target = {"boxes": torch.rand(n, 4, generator=g), "labels": torch.full((n,), i), "key": f"k{i}",
                  "record": {"index": i, "epoch": epoch}}
        items.append((torch.rand(3, size, size, generator=g), target))
    return items


def test_official_scales():
    assert multiscale_sizes(640, 3) == [480, 512, 544, 576, 608, 640, 640, 640, 800, 768, 736, 704, 672]
    assert multiscale_sizes(640, 20).count(640) == 20 and len(multiscale_sizes(640, 4)) == 14


def test_mixup_blends_roll_by_one_and_concatenates_targets():
    items = _items([0, 1, 2], size=8)
    images = torch.stack([x[0] for x in items])
    targets = [x[1] for x in items]
    batch = BatchRecord(epoch=5, size=8, resized=False, mixup=True, beta=0.5123, indices=[0, 1, 2], keys=[])
    out, mixed = apply_batch_record(batch, images.clone(), targets)
    torch.testing.assert_close(out[1], 0.5123 * images[1] + (1 - 0.5123) * images[0])
    torch.testing.assert_close(out[0], 0.5123 * images[0] + (1 - 0.5123) * images[2])
    assert mixed[0]["labels"].tolist() == targets[0]["labels"].tolist() + targets[2]["labels"].tolist()
    assert torch.equal(mixed[0]["boxes"], torch.cat([targets[0]["boxes"], targets[2]["boxes"]]))
    assert mixed[0]["mixup"].tolist() == [torch.tensor(0.5123).item()] * 1 + [torch.tensor(1 - 0.5123).item()] * 3
    assert mixed[0]["mixup_key"] == "k2"
