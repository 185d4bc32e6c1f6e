"""Feature store: quantisation, whole-shard writes, markers, resume, refusal by name."""
import errno

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from teacher_cache.quantize import decode, encode, quantize_int8
from teacher_cache.store import Store, StoreError, StoreMismatch
from teacher_cache.views import ViewPlan

GRID, DIM = (3, 2), 16


def fingerprint(name="dinov3_vits", sha="a" * 64, precision="fp32"):
    return {"name": name, "arch": "vit_small_patch16_dinov3", "embed_dim": DIM, "weights_sha256": sha,
            "weights_source": "random-init",
            "protocol": {"resample": "avgpool2x2", "grid_stride": 32, "precision": precision}}


def make(url, n=5, plan=ViewPlan(k=1, epochs=(1, 2, 3), input_size=(96, 64)), dtype="int8", **kw):
    args = dict(teacher=fingerprint(), plan=plan, dataset_hash="d1", keys=[f"img{i}" for i in range(n)],
                grid=GRID, dtype=dtype, shard_size=2)
    args.update(kw)
    return Store.create(url, **args)


def shard_data(store, shard, seed=0):
    start, stop = store.shard_range(shard)
    g = torch.Generator().manual_seed(seed + shard)
    grids = torch.randn(stop - start, store.num_views, DIM, *GRID, generator=g)
    tokens, scale = encode(grids.flatten(0, 1), store.dtype)
    shape = (stop - start, store.num_views)
    return grids, tokens.reshape(*shape, *tokens.shape[1:]).numpy(), (
        None if scale is None else scale.reshape(*shape, -1).numpy())


def test_int8_per_token_fidelity():
    x = torch.randn(64, 400, 768)
    x[..., :4] *= 12  # outlier channels, the hard case for int8
    q, s = quantize_int8(x)
    y = q.float() * s.float().unsqueeze(-1)
    assert F.cosine_similarity(x, y, dim=-1).min() > 0.998
    q0, s0 = quantize_int8(torch.zeros(2, 3))
    assert torch.equal(q0, torch.zeros(2, 3, dtype=torch.int8)) and torch.equal(s0.float(), torch.zeros(2))
    grid = torch.randn(2, 8, 3, 2)
    assert torch.equal(decode(*encode(grid, "float16"), (3, 2)), grid.half().float())


@pytest.mark.parametrize("dtype", ["int8", "float16"])
def test_round_trip_and_exact_view_set(tmp_path, dtype):
    store = make(str(tmp_path / "s"), dtype=dtype)
    assert store.num_views == 4 and store.num_shards == 3
    written = {}
    for shard in range(store.num_shards):
        grids, tokens, scale = shard_data(store, shard)
        store.write_shard(shard, tokens, scale)
        written[shard] = grids
    store = Store.open(str(tmp_path / "s"))
    assert store.completed_shards() == {0, 1, 2}
    for i in range(5):
        for v in range(4):
            ref = written[i // 2][i % 2, v]
            got = store.read(f"img{i}", v)
            assert got.shape == (DIM, *GRID)
            zarr_read = np.asarray(store.tokens[i, v]).astype(np.float32)  # the fast path == zarr
            if store.scale is not None:
                zarr_read = zarr_read * np.asarray(store.scale[i, v]).astype(np.float32)[:, None]
            assert np.array_equal(got.flatten(1).T.numpy(), zarr_read)
            assert F.cosine_similarity(got.flatten(1), ref.flatten(1), dim=0).mean() > 0.999
        assert store.read(i, 4) is None  # outside the plan
        assert store.shard_index_problems(i // 2) == []
    batch, present = store.read_batch(["img4", 1, 2], [3, 0, 7])
    assert present.tolist() == [True, True, False]
    torch.testing.assert_close(batch[0], store.read(4, 3))
    assert batch[2].abs().sum() == 0
    with pytest.raises(KeyError, match="nope"):
        store.read("nope", 0)


def test_bytes_per_view_for_the_official_grid(tmp_path):
    store = Store.create(str(tmp_path / "s"), teacher={**fingerprint(), "embed_dim": 768},
                         plan=ViewPlan(k=0), dataset_hash="d", keys=["a", "b"], grid=(20, 20),
                         dtype="int8", shard_size=2)
    tokens, scale = encode(torch.randn(4, 768, 20, 20), "int8")
    marker = store.write_shard(0, tokens.reshape(2, 2, 400, 768).numpy(), scale.reshape(2, 2, 400).numpy())
    assert store.bytes_per_view() == 308_000   # payload; each view adds a 4-byte CRC-32C per array
    assert marker["bytes"] / 4 <= 310_000  # 0.31 MB per 20x20x768 view, index included


def test_incomplete_shard_reads_as_absent_and_is_rewritten(tmp_path, monkeypatch):
    store = make(str(tmp_path / "s"))
    _, tokens, scale = shard_data(store, 0)
    original = type(store.scale).__setitem__

    def disk_full(self, *a):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(type(store.scale), "__setitem__", disk_full)
    with pytest.raises(OSError, match="No space left"):
        store.write_shard(0, tokens, scale)  # tokens written, scales not: a partial shard
    monkeypatch.setattr(type(store.scale), "__setitem__", original)
    reopened = Store.open(str(tmp_path / "s"))
    assert reopened.completed_shards() == set() and reopened.read(0, 0) is None
    assert reopened.shard_index_problems(0)  # scale shard absent
    reopened = make(str(tmp_path / "s"))  # a resumed run re-opens the same store ...
    reopened.write_shard(0, tokens, scale)  # ... and rewrites the whole shard
    assert Store.open(str(tmp_path / "s")).completed_shards() == {0}
    (tmp_path / "s" / "done" / "000000.json").write_text("{torn")
    assert Store.open(str(tmp_path / "s")).completed_shards() == set()


def test_mismatches_are_refused_by_name(tmp_path):
    url = str(tmp_path / "s")
    store = make(url)
    with pytest.raises(StoreMismatch, match="teacher"):
        store.check_compatible(teacher="dinov3_vitb")
    with pytest.raises(StoreMismatch, match=r"teacher \(weights_sha256\)"):
        store.check_compatible(teacher=fingerprint(sha="b" * 64))
    with pytest.raises(StoreMismatch, match="input size"):
        store.check_compatible(input_size=640)
    with pytest.raises(StoreMismatch, match="view plan"):
        store.check_compatible(plan_hash=ViewPlan(k=2))
    with pytest.raises(StoreMismatch, match="dataset"):
        store.check_compatible(dataset_hash="other")
    store.check_compatible(teacher=fingerprint(precision="bf16"), input_size=(96, 64),
                           plan_hash=store.plan, dataset_hash="d1", dtype="int8")
    with pytest.raises(StoreMismatch, match="teacher"):  # resume with another teacher
        make(url, teacher=fingerprint(name="dinov3_vitb"))
    with pytest.raises(StoreMismatch, match="precision"):
        make(url, teacher=fingerprint(precision="bf16"))


def test_foreign_directory_is_refused(tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "holiday.jpg").write_bytes(b"x")
    with pytest.raises(StoreError, match="already holds something else.*holiday.jpg"):
        make(str(tmp_path / "photos"))
    assert (tmp_path / "photos" / "holiday.jpg").read_bytes() == b"x"
    with pytest.raises(StoreError, match="no teacher-feature store"):
        Store.open(str(tmp_path / "photos"))


def test_fsspec_url_store():
    url = "memory://teacher-cache-test"
    store = make(url, n=2)
    grids, tokens, scale = shard_data(store, 0)
    store.write_shard(0, tokens, scale)
    got = Store.open(url).read("img1", 2)
    assert F.cosine_similarity(got.flatten(1), grids[1, 2].flatten(1), dim=0).mean() > 0.999


@pytest.mark.parametrize("fault", ["flip", "truncate", "delete"])
def test_damaged_view_is_detected_on_read_and_by_verify(tmp_path, fault):
    """Every view carries a CRC-32C: a flipped byte, a truncated shard object or a deleted one reads
    as a damaged view (a ViewError naming the object and view), and verify() reports it."""
    from teacher_cache.precompute import verify
    from teacher_cache.store import ViewError
    store = make(str(tmp_path / "s"))
    for shard in range(store.num_shards):
        _, tokens, scale = shard_data(store, shard)
        store.write_shard(shard, tokens, scale)
    assert verify(Store.open(str(tmp_path / "s")))["problems"] == []
    obj = tmp_path / "s" / "tokens" / "c" / "1" / "0" / "0" / "0"
    raw = bytearray(obj.read_bytes())
    if fault == "flip":
        raw[-10] ^= 0xFF                      # inside the last view's payload
        obj.write_bytes(bytes(raw))
    elif fault == "truncate":
        obj.write_bytes(bytes(raw[:-40]))
    else:
        obj.unlink()
    store = Store.open(str(tmp_path / "s"))
    assert store.read(0, 0) is not None       # shard 0 is intact
    with pytest.raises(ViewError, match="tokens"):
        store.read(3, store.num_views - 1)    # the last chunk of shard 1's object
    problems = verify(store)["problems"]
    assert problems and all("shard 1" in p for p in problems), problems
