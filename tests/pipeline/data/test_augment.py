"""Replayable augmentation: records are pure, serialisable, and replay bit-for-bit for every op."""
import json
import random
from dataclasses import replace

import numpy as np
import pytest
import torch
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as F

from pipeline.data.augment import (AugmentedDataset, AugRecord, apply_record, photometric, plain_record, record_for,
                              sample_record)
from pipeline.data.coco import load_coco
from pipeline.data.policy import AugPolicy
from pipeline.data.synthetic import generate

POLICY = AugPolicy(epochs=(1, 2, 3), output_size=(128, 128), mosaic_tile=48)  # 0: plain, 1: mosaic, 2: crop
OPS = ("mosaic", "photometric", "zoom_out", "iou_crop")


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    root = generate(tmp_path_factory.mktemp("synthetic"), splits={"train": 12}, size=96)
    return load_coco(root / "annotations" / "instances_train.json", image_root=root / "train")


def _find(ds, op, policy=POLICY):
    """A sampled record in which ``op`` fired, with every other random op switched off."""
    for epoch in range(policy.epochs[0], policy.epochs[2]):
        for index in range(len(ds)):
            rec = record_for(ds, policy, 0, epoch, index)
            if getattr(rec, op) is not None:
                return replace(rec, **{o: None for o in OPS if o != op})
    raise AssertionError(f"{op} never fired")


def _replay(ds, record, convert=True):
    """Replay from the json form of the record on freshly decoded images."""
    rec = AugRecord.from_dict(json.loads(json.dumps(record.to_dict())))
    return apply_record(rec, *ds[rec.index], load_partner=ds.__getitem__, convert=convert)


def _equal(a, b):
    assert torch.equal(a[0], b[0])
    assert torch.equal(a[1]["boxes"], b[1]["boxes"]) and torch.equal(a[1]["labels"], b[1]["labels"])


def test_sample_record_is_pure_and_json_serialisable(ds):
    a = record_for(ds, POLICY, 3, 1, 5)
    torch.manual_seed(123), np.random.seed(7), random.seed(9)  # the global RNGs must not matter
    assert record_for(ds, POLICY, 3, 1, 5) == a
    assert AugRecord.from_dict(json.loads(json.dumps(a.to_dict()))) == a
    assert record_for(ds, POLICY, 4, 1, 5) != a and record_for(ds, POLICY, 3, 1, 6) != a


@pytest.mark.parametrize("op", OPS + ("flip",))
def test_each_op_replays_bit_exact_and_acts(ds, op):
    if op == "flip":
        rec, base = plain_record(2, flip=True, size=128), plain_record(2, flip=False, size=128)
    else:
        rec = _find(ds, op)
        base = replace(rec, **{op: None})
    first = _replay(ds, rec)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a DataLoader worker runs single-threaded
    try:
        _equal(first, _replay(ds, rec))
    finally:
        torch.set_num_threads(threads)
    assert first[0].shape == (3, 128, 128) and first[0].dtype == torch.float32
    assert not torch.equal(first[0], _replay(ds, base)[0]), f"{op} had no effect"


@pytest.mark.parametrize("epoch", [0, 1, 2, 3])
def test_full_pipeline_replays_bit_exact(ds, epoch):
    aug = AugmentedDataset(ds, POLICY, seed=11)
    kinds = set()
    for index in range(len(ds)):
        image, target = aug[(epoch, index)]
        rec = AugRecord.from_dict(target["record"])
        kinds |= {o for o in OPS if getattr(rec, o) is not None}
        _equal((image, target), _replay(ds, rec))
        boxes = target["boxes"]
        assert ((boxes >= 0) & (boxes <= 1)).all() and (boxes[:, 2:] > 0).all()
        assert target["key"] == ds.key(index) and target["labels"].dtype == torch.int64
    assert kinds == {0: set(), 1: {"mosaic", "photometric", "zoom_out", "iou_crop"},
                     2: {"photometric", "zoom_out", "iou_crop"}, 3: set()}[epoch]


def test_boxes_stay_inside_and_degenerate_are_dropped(ds):
    for epoch in (1, 2):
        for index in range(len(ds)):
            image, target = _replay(ds, record_for(ds, POLICY, 5, epoch, index), convert=False)
            b = target["boxes"]
            assert (b[:, 0] >= 0).all() and (b[:, 1] >= 0).all() and (b[:, 2] <= 128).all() and (b[:, 3] <= 128).all()
            assert ((b[:, 2:] - b[:, :2]) >= 1).all()
            assert len(target["labels"]) == len(b)


def test_geometry_of_zoom_crop_flip(ds):
    image, target = ds[0]
    h, w = image.shape[-2:]
    boxes = target["boxes"].as_subclass(torch.Tensor)
    # zoom out to an output of exactly the padded size: the source sits at (left, top), padding is 0
    rec = AugRecord(index=0, size=(h + 30, w + 50), zoom_out=[20, 10, 30, 20])
    out, t = apply_record(rec, image, target, convert=False)
    assert torch.equal(out[:, 10:10 + h, 20:20 + w], image) and out[:, :10].sum() == 0
    torch.testing.assert_close(t["boxes"].as_subclass(torch.Tensor), boxes + torch.tensor([20., 10, 20, 10]))
    # crop: boxes shifted and clipped, boxes whose centre leaves the crop are removed
    top, left, ch, cw = 5, 7, h // 2, w // 2
    out, t = apply_record(AugRecord(index=0, size=(ch, cw), iou_crop=[top, left, ch, cw]), image, target, convert=False)
    assert torch.equal(out, image[:, top:top + ch, left:left + cw])
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    inside = (centre[:, 0] > left) & (centre[:, 0] < left + cw) & (centre[:, 1] > top) & (centre[:, 1] < top + ch)
    expect = (boxes[inside] - torch.tensor([left, top, left, top])).clamp(min=0)
    expect[:, 0::2] = expect[:, 0::2].clamp(max=cw)
    expect[:, 1::2] = expect[:, 1::2].clamp(max=ch)
    expect = expect[((expect[:, 2:] - expect[:, :2]) >= 1).all(1)]
    torch.testing.assert_close(t["boxes"].as_subclass(torch.Tensor), expect)
    # flip at the native size mirrors pixels and boxes
    out, t = apply_record(plain_record(0, flip=True, size=(h, w)), image, target, convert=False)
    assert torch.equal(out, image.flip(-1))
    torch.testing.assert_close(t["boxes"].as_subclass(torch.Tensor), torch.stack(
        [w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], 1))


def test_photometric_equals_official_pil_op(ds):
    """The official pipeline runs RandomPhotometricDistort on PIL images; ours gives the same pixels."""
    image = ds[1][0]
    params = {"brightness": 1.1, "contrast": 0.7, "saturation": 1.3, "hue": 0.03, "contrast_before": False,
              "channel_perm": [2, 0, 1]}
    ours = photometric(image.as_subclass(torch.Tensor), params)
    official = T.RandomPhotometricDistort().transform(F.to_pil_image(image), {
        "brightness_factor": 1.1, "contrast_factor": 0.7, "saturation_factor": 1.3, "hue_factor": 0.03,
        "contrast_before": False, "channel_permutation": torch.tensor([2, 0, 1])})
    assert torch.equal(ours, F.pil_to_tensor(official))


def test_policy_phases_and_frequencies(ds):
    policy = AugPolicy(epochs=(4, 29, 50))
    assert [policy.phase(e) for e in (0, 3, 4, 28, 29, 49, 50, 80)] == [1, 1, 2, 2, 3, 3, 4, 4]
    assert policy.phase_epochs(2) == range(4, 29)
    assert policy.mosaic_tile == 320 and AugPolicy(output_size=128).output_size == (128, 128)
    assert AugPolicy(output_size=128).mosaic_tile == 64

    def freq(epoch, fn, n=200):
        return np.mean([fn(sample_record(0, epoch, i, policy, 1000, (640, 480), [[10, 10, 200, 200]]))
                        for i in range(n)])

    assert 0.4 < freq(10, lambda r: r.mosaic is not None) < 0.6
    assert freq(10, lambda r: r.mosaic is not None and (r.zoom_out or r.iou_crop) is not None) == 0
    assert freq(30, lambda r: r.mosaic is not None) == 0
    assert 0.4 < freq(30, lambda r: r.zoom_out is not None) < 0.6
    assert 0.3 < freq(30, lambda r: r.iou_crop is not None) < 0.8  # p .8 times "not the keep-as-is option"
    assert 0.4 < freq(30, lambda r: r.photometric is not None) < 1.0
    for epoch in (0, 60):
        assert freq(epoch, lambda r: r.is_plain) == 1
        assert 0.4 < freq(epoch, lambda r: r.flip) < 0.6


def test_eval_view_is_plain_record(ds):
    aug = AugmentedDataset(ds, None, size=128)
    image, target = aug[3]
    _equal((image, target), _replay(ds, plain_record(3, flip=False, size=128)))
    assert target["record"]["phase"] == 0 and AugRecord.from_dict(target["record"]).is_plain


def test_taco_pipeline_replays(taco_dir):
    from pipeline.data.load import load_dataset
    taco = load_dataset(taco_dir, split="val")
    policy = AugPolicy(epochs=(0, 1, 2), output_size=(320, 320), mosaic_tile=160)
    aug = AugmentedDataset(taco, policy, seed=0)
    for epoch, index in [(0, 0), (0, 1), (1, 3)]:
        image, target = aug[(epoch, index)]
        _equal((image, target), _replay(taco, AugRecord.from_dict(target["record"])))
        assert ((target["boxes"] >= 0) & (target["boxes"] <= 1)).all()


def test_mosaic_layout_without_affine(ds):
    """Identity affine: the 2x2 canvas holds the 4 images resized to the tile size, boxes offset with them."""
    tile = 48
    rec = AugRecord(index=0, mosaic={"partners": [1, 2, 3], "tile": tile, "angle": 0.0, "translate": [0.0, 0.0],
                                     "scale": 1.0, "fill": 0}, size=(1, 1))
    tiles = [F.resize(ds[i][0], [tile], antialias=True) for i in range(4)]
    th, tw = max(t.shape[-2] for t in tiles), max(t.shape[-1] for t in tiles)
    out, t = apply_record(replace(rec, size=(2 * th, 2 * tw)), *ds[0], load_partner=ds.__getitem__, convert=False)
    for (ox, oy), img in zip([(0, 0), (tw, 0), (0, th), (tw, th)], tiles):
        assert torch.equal(out[:, oy:oy + img.shape[-2], ox:ox + img.shape[-1]], img)
    expect = []
    for (ox, oy), i in zip([(0, 0), (tw, 0), (0, th), (tw, th)], range(4)):
        b = F.resize(ds[i][1]["boxes"], [tile]).as_subclass(torch.Tensor) + torch.tensor([ox, oy, ox, oy])
        expect.append(b)
    expect = torch.cat(expect)
    keep = ((expect[:, 2:] - expect[:, :2]) >= 1).all(1)
    torch.testing.assert_close(t["boxes"].as_subclass(torch.Tensor), expect[keep])
    assert torch.equal(t["labels"], torch.cat([ds[i][1]["labels"] for i in range(4)])[keep])


def test_images_without_boxes_go_through_every_op():
    from torchvision import tv_tensors
    image = tv_tensors.Image(torch.randint(0, 255, (3, 60, 80), dtype=torch.uint8))
    target = {"boxes": tv_tensors.BoundingBoxes(torch.zeros(0, 4), format="XYXY", canvas_size=(60, 80)),
              "labels": torch.zeros(0, dtype=torch.int64), "image_id": torch.tensor(0),
              "orig_size": torch.tensor([80, 60]), "key": "empty"}
    policy = AugPolicy(epochs=(0, 1, 2), output_size=64)
    for epoch in (0, 1):
        for index in range(10):
            rec = sample_record(0, epoch, index, policy, 5, (80, 60), None)
            assert rec.iou_crop is None  # no box centre can be kept: RandomIoUCrop leaves the image as is
            out, t = apply_record(rec, image, target, load_partner=lambda j: (image, target))
            assert out.shape == (3, 64, 64) and t["boxes"].shape == (0, 4)
