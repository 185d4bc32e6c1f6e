"""Batch collate: official scales list, MixUp formula and targets, seeded reproducible batch records."""
import torch

from pipeline.data.collate import BatchRecord, Collate, apply_batch_record, multiscale_sizes


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


def test_batch_record_is_seeded_by_epoch_and_composition():
    c = Collate(seed=1, mixup_prob=0.5, mixup_epochs=(0, 10), stop_epoch=10, base_size=128, base_size_repeat=3)
    a = c(_items([3, 1, 4]))
    b = c(_items([3, 1, 4]))
    assert a[2] == b[2] and torch.equal(a[0], b[0])
    records = [c(_items([i, i + 1]))[2] for i in range(0, 200, 2)]
    assert 0.35 < sum(r.mixup for r in records) / len(records) < 0.65
    assert all(r.resized and r.size in (96, 128, 160) for r in records)
    assert {r.size for r in records} == {96, 128, 160}
    assert all(0.45 <= r.beta <= 0.55 for r in records if r.mixup)


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


def test_schedule_off_outside_epochs_and_epoch_from_records():
    c = Collate(seed=0, mixup_prob=1.0, mixup_epochs=(4, 29), stop_epoch=50, base_size=32, base_size_repeat=3)
    images, targets, rec = c(_items([5, 6], epoch=60))
    assert rec.epoch == 60 and not rec.mixup and not rec.resized and images.shape[-1] == 32
    images, targets, rec = c(_items([5, 6], epoch=10))
    assert rec.mixup and rec.resized and images.shape[-2:] == (rec.size, rec.size) and "mixup" in targets[0]
    ev = Collate.for_eval()
    images, _, rec = ev(_items([1, 2], epoch=10))
    assert not rec.mixup and not rec.resized and images.shape[-1] == 32
