"""WebDataset shards: exact round trip, random access by byte range, DDP/worker splitting, resume."""
import json
import shutil
from collections import Counter

import fsspec
import pytest
import torch
from torch.utils.data import DataLoader

from pipeline.data.dataset import DatasetError
from pipeline.data.load import load_dataset
from pipeline.data.shards import ShardDataset, ShardStream, member_stem, write_shards
from pipeline.data.synthetic import generate


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = generate(tmp_path_factory.mktemp("synthetic"), splits={"val": 23}, size=96)
    return load_dataset(root, split="val")


@pytest.fixture(scope="module")
def shards(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    write_shards(dataset, out, shard_size=5, progress=False)  # 5 shards: 5,5,5,5,3
    return out


def keys_of(stream, num_workers=0):
    loader = DataLoader(stream, batch_size=None, num_workers=num_workers)
    return [t["key"] for _, t in loader]


def assert_same_sample(sample, dataset):
    image, target = sample
    ref_image, ref_target = dataset[target["index"]]
    assert target["key"] == ref_target["key"] == dataset.key(target["index"])
    assert torch.equal(image, ref_image)
    assert torch.equal(target["boxes"], ref_target["boxes"])
    assert torch.equal(target["labels"], ref_target["labels"])
    assert int(target["image_id"]) == int(ref_target["image_id"])


def test_round_trip_is_exact_and_in_order(dataset, shards):
    manifest = json.loads((shards / "manifest.json").read_text())
    assert [s["count"] for s in manifest["shards"]] == [5, 5, 5, 5, 3]
    assert manifest["dataset_hash"] == dataset.content_hash()
    assert manifest["label_to_category_id"] == dataset.label_to_category_id
    samples = list(ShardStream(shards))
    assert [t["key"] for _, t in samples] == [dataset.key(i) for i in range(len(dataset))]
    for sample in samples:
        assert_same_sample(sample, dataset)
    index = ShardDataset(shards)  # random access by byte range: the same samples and annotations
    assert len(index) == len(dataset) and index.content_hash() == dataset.content_hash()
    index.prefetch([22, 7, 0, 7])
    assert index.io["requests"] == 3
    for i in (0, 7, 22):
        image, target = index[i]
        assert_same_sample((image, {**target, "index": i}), dataset)
        assert index.key(i) == dataset.key(i)
        assert {k: index.annotation(i)[k] for k in dataset.annotation(i)} == dataset.annotation(i)
    assert index.io["requests"] == 3                    # served from the prefetched bytes


def test_keys_with_dots_survive():
    assert member_stem("a.b/c%d.e") == "a%2Eb/c%25d%2Ee"


@pytest.mark.parametrize("explicit", [True, False])
def test_exact_mode_each_sample_once_over_ranks_and_workers(dataset, shards, explicit, monkeypatch):
    seen = []
    for rank in range(2):
        if explicit:
            stream = ShardStream(shards, rank=rank, world_size=2, shuffle_shards=True, seed=3)
        else:  # wds.split_by_node reads RANK / WORLD_SIZE
            monkeypatch.setenv("RANK", str(rank))
            monkeypatch.setenv("WORLD_SIZE", "2")
            stream = ShardStream(shards, shuffle_shards=True, seed=3)
        seen += keys_of(stream, num_workers=2)
    assert Counter(seen) == Counter(dataset.key(i) for i in range(len(dataset)))


def test_transform_and_remote_urls(dataset, shards):
    def flip(image, target):
        return image.flip(-1), target

    # pipe: commands (wds gopen) and fsspec URLs (here the in-memory filesystem standing in for s3://)
    piped = ShardStream(shards, transform=flip, url_template=f"pipe:cat {shards}/{{name}}")
    fs = fsspec.filesystem("memory")
    for path in shards.iterdir():
        fs.pipe(f"/shards-test/{path.name}", path.read_bytes())
    remote = ShardStream("memory://shards-test")
    for (a, ta), (b, tb) in zip(piped, remote, strict=True):
        assert ta["key"] == tb["key"]
        assert torch.equal(a, b.flip(-1))
    assert torch.equal(ShardDataset("memory://shards-test")[4][0], dataset[4][0])
    with pytest.raises(DatasetError, match="manifest.json"):
        ShardStream("memory://nothing-here")


def test_resume_keeps_complete_shards_and_rejects_other_data(dataset, shards, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(shards, out)
    (out / "shard-000002.tar").unlink()
    (out / "shard-000002.tar.tmp").write_bytes(b"partial garbage")  # an interrupted write
    kept = (out / "shard-000001.tar").stat().st_mtime_ns
    manifest = write_shards(dataset, out, shard_size=5, progress=False)
    assert (out / "shard-000001.tar").stat().st_mtime_ns == kept
    assert not (out / "shard-000002.tar.tmp").exists()
    for name in ("shard-000002.tar", "manifest.json", "index.json"):
        assert (out / name).read_bytes() == (shards / name).read_bytes()
    assert manifest["num_samples"] == len(dataset)
    with pytest.raises(DatasetError, match="shard_size"):
        write_shards(dataset, out, shard_size=7, progress=False)


def test_make_shards_job_on_embedded_default(tmp_path):
    from jobs.make_shards import main

    manifest = main(["--out", str(tmp_path), "--split", "val", "--shard-size", "16"])
    dataset = load_dataset(None, split="val")
    assert manifest["num_samples"] == len(dataset) and manifest["num_shards"] == -(-len(dataset) // 16)
    assert manifest["label_to_category_id"] == dataset.label_to_category_id
    assert keys_of(ShardStream(tmp_path)) == [dataset.key(i) for i in range(len(dataset))]


def test_make_shards_job_on_taco(taco_dir, tmp_path):
    from jobs.make_shards import main

    manifest = main(["--data", str(taco_dir), "--split", "val", "--out", str(tmp_path), "--shard-size", "100"])
    assert [s["count"] for s in manifest["shards"]] == [100, 100, 25]
    assert len(manifest["class_names"]) == 60
    dataset = load_dataset(taco_dir, split="val")
    samples = list(ShardStream(tmp_path, rank=1, world_size=2))  # shard 1 only
    assert [t["index"] for _, t in samples] == list(range(100, 200))
    for sample in samples[::25]:
        assert_same_sample(sample, dataset)
    assert (tmp_path / "shard-000000.tar").read_bytes().count(dataset.raw(0)[0]) == 1  # bytes as stored


def test_stream_augmentation_equals_augmented_dataset(dataset, shards):
    from pipeline.data.augment import AugmentedDataset
    from pipeline.data.policy import AugPolicy

    policy = AugPolicy(epochs=(0, 1, 2), output_size=(128, 128), mosaic_tile=48)  # epoch 0: mosaic phase
    reference = AugmentedDataset(dataset, policy, seed=5)
    mosaics = 0
    for epoch in (0, 1):
        stream = ShardStream(shards, rank=0, world_size=1, seed=5, policy=policy, epoch=epoch,
                             shuffle_shards=True)
        samples = list(stream)
        assert sorted(t["index"] for _, t in samples) == list(range(len(dataset)))
        for image, target in samples:
            ref_image, ref_target = reference[(epoch, target["index"])]
            assert target["record"] == ref_target["record"]
            assert torch.equal(image, ref_image)
            assert torch.equal(target["boxes"], ref_target["boxes"])
            assert torch.equal(target["labels"], ref_target["labels"])
            mosaics += target["record"]["mosaic"] is not None
    assert mosaics > 0  # partners were read by random access from the shards
