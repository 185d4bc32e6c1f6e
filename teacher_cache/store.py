"""Zarr v3 teacher-feature store: one inner chunk per (image, view), a few hundred images per shard.

Layout (a local path or any fsspec URL, e.g. s3://bucket/cache):

    manifest.json     teacher fingerprint, protocol, dataset hash, view plan, dtype, sizes
    keys.json         sample keys in index order
    zarr.json         the Zarr group
    tokens/           [N, V, h*w, C] int8 (or float16); chunk (1, 1, h*w, C); shard (S, V, h*w, C)
    scale/            [N, V, h*w] float16 per-token scales (int8 stores only); same sharding
    done/000012.json  completion marker of shard 12, written after the shard is verified

Writes: exactly one writer per shard, whole shards in one
call (no read-modify-write), verified, then marked. A shard without a valid marker reads as absent
and is rewritten from scratch by the next run, so an interrupted job never leaves a partial shard
that reads as complete.
"""
from __future__ import annotations

import hashlib
import json
import os
import time

import fsspec
import google_crc32c
import numpy as np
import torch
import zarr
from fsspec.implementations.local import LocalFileSystem
from zarr.codecs import BytesCodec, Crc32cCodec, ShardingCodec

from detector.checkpoint import atomic_write

from .views import ViewPlan

BUDGET_DTYPES = ("int8", "float16")  # the budget (K-views) store; int4 is exact-store only
FORMAT = "rtdetrv4-teacher-cache"
FORMAT_VERSION = 2   # v2: a CRC-32C per view (inner chunk)
OUR_ENTRIES = {"manifest.json", "keys.json", "zarr.json", "tokens", "scale", "done"}
_MISSING = np.uint64(2**64 - 1)


class StoreError(ValueError):
    """The location is not a usable store (missing, foreign content, damaged)."""


class ViewError(StoreError):
    """One view cannot be served: ``kind`` is "missing" (not written yet) or "damaged"."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


class StoreMismatch(StoreError):
    """The store was made for another teacher, resolution, view plan, dataset or dtype."""


def keys_sha256(keys: list[str]) -> str:
    return hashlib.sha256("\n".join(keys).encode()).hexdigest()


def teacher_identity(fingerprint: dict) -> dict:
    """What makes two teachers' targets interchangeable (precision is within 0.999 cosine)."""
    proto = {k: v for k, v in fingerprint["protocol"].items() if k not in ("precision", "bf16_fidelity")}
    return {"name": fingerprint["name"], "arch": fingerprint["arch"],
            "weights_sha256": fingerprint["weights_sha256"], "protocol": proto}


class Store:
    """Reader/writer of one teacher-feature store. Create with ``Store.create``, read with
    ``Store.open``; ``read(key_or_index, view)`` returns a dequantised [C, h, w] grid or None."""

    def __init__(self, url: str, manifest: dict, keys: list[str], mode: str = "r"):
        self.url, self.manifest, self.keys = url, manifest, keys
        self.fs, self.root = fsspec.core.url_to_fs(url)
        self._index = {k: i for i, k in enumerate(keys)}
        group = zarr.open_group(store=_zarr_store(url, self.fs, self.root, read_only=mode == "r"),
                                mode="r" if mode == "r" else "r+")
        self.tokens = group["tokens"]
        self.scale = group["scale"] if self.dtype == "int8" else None
        self.refresh()

    # --- manifest facts -------------------------------------------------------------------
    num_images = property(lambda self: self.manifest["num_images"])
    num_views = property(lambda self: self.manifest["view_plan"]["num_views"])
    shard_size = property(lambda self: self.manifest["shard_size"])
    dtype = property(lambda self: self.manifest["dtype"])
    grid = property(lambda self: tuple(self.manifest["grid"]))
    dim = property(lambda self: self.manifest["teacher"]["embed_dim"])
    plan = property(lambda self: ViewPlan.from_dict(self.manifest["view_plan"]))

    @property
    def num_shards(self) -> int:
        return -(-self.num_images // self.shard_size)

    def shard_range(self, shard: int) -> tuple[int, int]:
        return shard * self.shard_size, min((shard + 1) * self.shard_size, self.num_images)

    def bytes_per_view(self) -> int:
        h, w = self.grid
        return h * w * (self.dim + 2 if self.dtype == "int8" else 2 * self.dim)

    # --- paths ----------------------------------------------------------------------------
    def _path(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    def _marker(self, shard: int) -> str:
        return self._path("done", f"{shard:06d}.json")

    # --- create / open --------------------------------------------------------------------
    @classmethod
    def create(cls, url: str, *, teacher: dict, plan: ViewPlan, dataset_hash: str, keys: list[str],
               grid: tuple[int, int], dtype: str = "int8", shard_size: int = 256,
               extra: dict | None = None) -> "Store":
        """Create a store, or re-open the same store to resume it (refused by name if it differs)."""
        if dtype not in BUDGET_DTYPES:
            raise ValueError(f"a --views K store's dtype must be one of {BUDGET_DTYPES}, got {dtype!r}")
        if len(set(keys)) != len(keys):
            raise StoreError("dataset sample keys are not unique; the store needs one key per image")
        fs, root = fsspec.core.url_to_fs(url)
        require_bucket(fs, root, url)
        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "teacher": teacher,
            "dataset": {"hash": dataset_hash, "num_images": len(keys), "keys_sha256": keys_sha256(keys)},
            "view_plan": {**plan.to_dict(), "hash": plan.hash(), "num_views": plan.num_views},
            "num_images": len(keys), "grid": list(grid), "dtype": dtype, "shard_size": shard_size,
            "layout": {"tokens": "[N, V, h*w, C]", "scale": "[N, V, h*w] fp16 (int8 only)",
                       "chunk": "one view", "shard": f"{shard_size} images x all views"},
            **(extra or {}),
        }
        if fs.exists(f"{root}/manifest.json"):
            store = cls.open(url, mode="r+")
            store._check_resume(manifest)
            return store
        if fs.exists(root):
            foreign = sorted(os.path.basename(p.rstrip("/")) for p in fs.ls(root, detail=False))
            foreign = [p for p in foreign if p not in OUR_ENTRIES]
            if foreign:
                raise StoreError(f"{url} already holds something else ({', '.join(foreign[:5])}"
                                 f"{'...' if len(foreign) > 5 else ''}) and no teacher-cache "
                                 "manifest: choose an empty or new --out location")
            fs.rm(root, recursive=True)  # an earlier creation that died before its manifest
        fs.makedirs(root, exist_ok=True)
        cls._create_arrays(url, fs, root, len(keys), plan.num_views, grid, teacher["embed_dim"],
                           dtype, shard_size)
        _write_json(fs, f"{root}/keys.json", keys)
        manifest["created"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        _write_json(fs, f"{root}/manifest.json", manifest)  # last: it makes the store a store
        return cls(url, manifest, keys, mode="r+")

    @staticmethod
    def _create_arrays(url, fs, root, n, v, grid, dim, dtype, shard_size):
        t = grid[0] * grid[1]
        group = zarr.open_group(store=_zarr_store(url, fs, root), mode="w")

        def array(name, shape, np_dtype):
            inner = (1, 1, *shape[2:])
            # a CRC-32C per view, checked by every read: damaged bytes never reach the loss silently
            codec = ShardingCodec(chunk_shape=inner, codecs=[BytesCodec(), Crc32cCodec()],
                                  index_codecs=[BytesCodec(), Crc32cCodec()], index_location="start")
            group.create_array(name, shape=shape, dtype=np_dtype, chunks=(shard_size, *shape[1:]),
                               serializer=codec, compressors=None, fill_value=0,
                               config={"write_empty_chunks": True})

        array("tokens", (n, v, t, dim), "int8" if dtype == "int8" else "float16")
        if dtype == "int8":
            array("scale", (n, v, t), "float16")

    @classmethod
    def open(cls, url: str, mode: str = "r") -> "Store":
        fs, root = fsspec.core.url_to_fs(url)
        require_bucket(fs, root, url)
        path = f"{root}/manifest.json"
        if not fs.exists(path):
            raise StoreError(f"no teacher-feature store at {url} (manifest.json missing): run "
                             "`python -m jobs.cache_teacher --out ...` first")
        manifest = _read_json(fs, path)
        if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
            raise StoreError(f"{url} is not a {FORMAT} v{FORMAT_VERSION} store")
        keys = _read_json(fs, f"{root}/keys.json")
        if keys_sha256(keys) != manifest["dataset"]["keys_sha256"]:
            raise StoreError(f"{url}: keys.json does not match its manifest (damaged store)")
        return cls(url, manifest, keys, mode=mode)

    # --- compatibility --------------------------------------------------------------------
    def _mismatch(self, what: str, stored, requested):
        raise StoreMismatch(
            f"teacher-feature store {self.url} was made for another {what}: the store has "
            f"{stored!r}, this run needs {requested!r}. Build a matching store with "
            "`python -m jobs.cache_teacher` (new --out) or point to one that matches")

    def check_compatible(self, teacher=None, input_size=None, plan_hash=None, dataset_hash=None,
                         dtype=None) -> None:
        """Raise StoreMismatch naming the first field where the store differs from the request.
        ``teacher``: a Teacher, its fingerprint() dict, or a name; ``plan_hash``: str or ViewPlan."""
        if teacher is not None:
            if isinstance(teacher, str):
                if teacher not in (self.manifest["teacher"]["name"], self.manifest["teacher"]["arch"]):
                    self._mismatch("teacher", self.manifest["teacher"]["name"], teacher)
            else:
                fp = teacher.fingerprint() if hasattr(teacher, "fingerprint") else teacher
                mine, theirs = teacher_identity(self.manifest["teacher"]), teacher_identity(fp)
                for field in ("name", "arch", "weights_sha256", "protocol"):
                    if mine[field] != theirs[field]:
                        self._mismatch(f"teacher ({field})", mine[field], theirs[field])
        if input_size is not None:
            size = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
            if tuple(self.plan.input_size) != size:
                self._mismatch("input size (resolution)", tuple(self.plan.input_size), size)
        if plan_hash is not None:
            ph = plan_hash.hash() if isinstance(plan_hash, ViewPlan) else plan_hash
            if ph != self.manifest["view_plan"]["hash"]:
                self._mismatch("view plan", self.manifest["view_plan"]["hash"], ph)
        if dataset_hash is not None and dataset_hash != self.manifest["dataset"]["hash"]:
            self._mismatch("dataset", self.manifest["dataset"]["hash"], dataset_hash)
        if dtype is not None and dtype != self.dtype:
            self._mismatch("dtype", self.dtype, dtype)

    def _check_resume(self, wanted: dict) -> None:
        """Resuming must continue the very same store (precision included)."""
        have = self.manifest
        self.check_compatible(teacher=wanted["teacher"], input_size=wanted["view_plan"]["input_size"],
                              plan_hash=wanted["view_plan"]["hash"],
                              dataset_hash=wanted["dataset"]["hash"], dtype=wanted["dtype"])
        for field, a, b in (("teacher precision", have["teacher"]["protocol"]["precision"],
                             wanted["teacher"]["protocol"]["precision"]),
                            ("dataset keys", have["dataset"]["keys_sha256"], wanted["dataset"]["keys_sha256"]),
                            ("grid", have["grid"], wanted["grid"]),
                            ("shard size", have["shard_size"], wanted["shard_size"])):
            if a != b:
                self._mismatch(field, a, b)

    # --- completion -----------------------------------------------------------------------
    def refresh(self) -> None:
        """Re-read the completion markers (cheap: one listing)."""
        done = set()
        try:
            names = self.fs.ls(self._path("done"), detail=False)
        except FileNotFoundError:
            names = []
        for name in names:
            base = os.path.basename(name)
            if base.endswith(".json") and base[:-5].isdigit():
                done.add(int(base[:-5]))
        self._done = {s for s in done if s < self.num_shards and self._marker_valid(s)}
        self._indexes: dict[tuple[int, int], np.ndarray] = {}

    def _marker_valid(self, shard: int) -> bool:
        try:
            m = _read_json(self.fs, self._marker(shard))
        except (ValueError, OSError):
            return False  # torn or unreadable marker: the shard is simply redone
        start, stop = self.shard_range(shard)
        return (m.get("plan_hash") == self.manifest["view_plan"]["hash"]
                and m.get("weights_sha256") == self.manifest["teacher"]["weights_sha256"]
                and m.get("keys_sha256") == keys_sha256(self.keys[start:stop]))

    def completed_shards(self) -> set[int]:
        return set(self._done)

    def is_complete(self, shard: int) -> bool:
        return shard in self._done

    # --- writing --------------------------------------------------------------------------
    def _shard_objects(self, shard: int) -> list[str]:
        names = ["tokens"] + (["scale"] if self.scale is not None else [])
        return [self._path(name, "c", str(shard), *(["0"] * (3 if name == "tokens" else 2)))
                for name in names]

    def write_shard(self, shard: int, tokens: np.ndarray, scale: np.ndarray | None = None) -> dict:
        """Write every view of one shard in one call, verify it, then write its marker."""
        start, stop = self.shard_range(shard)
        want = (stop - start, self.num_views, *self.tokens.shape[2:])
        if tuple(tokens.shape) != want:
            raise ValueError(f"shard {shard}: tokens shape {tuple(tokens.shape)} != {want}")
        if (scale is None) != (self.scale is None):
            need = "per-token scales" if self.scale is not None else "scale=None"
            raise ValueError(f"shard {shard}: an {self.dtype} store needs {need}")
        self.fs.rm_file(self._marker(shard)) if self.fs.exists(self._marker(shard)) else None
        self._done.discard(shard)
        self._indexes = {k: v for k, v in self._indexes.items() if k[1] != shard}
        for obj in self._shard_objects(shard):  # leftovers of an interrupted run: never patched
            if self.fs.exists(obj):
                self.fs.rm_file(obj)
        self.tokens[start:stop] = tokens
        if scale is not None:
            self.scale[start:stop] = scale
        self._verify_shard(shard, tokens, scale)
        marker = {"shard": shard, "start": start, "stop": stop, "views": self.num_views,
                  "plan_hash": self.manifest["view_plan"]["hash"],
                  "weights_sha256": self.manifest["teacher"]["weights_sha256"],
                  "keys_sha256": keys_sha256(self.keys[start:stop]),
                  "bytes": int(sum(self.fs.size(o) for o in self._shard_objects(shard))),
                  "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        _write_json(self.fs, self._marker(shard), marker)
        self._done.add(shard)
        return marker

    def _verify_shard(self, shard: int, tokens: np.ndarray, scale: np.ndarray | None) -> None:
        start, stop = self.shard_range(shard)
        problems = self.shard_index_problems(shard)
        if scale is not None and not np.array_equal(self.scale[start:stop], scale):
            problems.append("scales read back differ")
        for i in {0, stop - start - 1}:  # first and last image of the shard, all views
            if not np.array_equal(self.tokens[start + i], tokens[i]):
                problems.append(f"tokens of image {start + i} read back differ")
        if problems:
            raise StoreError(f"shard {shard} of {self.url} failed verification after writing: "
                             f"{'; '.join(problems)}")

    def shard_index_problems(self, shard: int) -> list[str]:
        """Check from the shard objects' indexes that every (image, view) chunk is present."""
        start, stop = self.shard_range(shard)
        problems = []
        for obj in self._shard_objects(shard):
            try:
                index = self._read_index(obj)
            except FileNotFoundError:
                problems.append(f"shard object {obj} missing")
                continue
            absent = np.argwhere(index[: stop - start, :, 0] == _MISSING)
            if len(absent):
                i, v = absent[0]
                problems.append(f"{len(absent)} views missing from {obj} "
                                f"(first: image {start + i}, view {v})")
        return problems

    # --- reading --------------------------------------------------------------------------
    def index_of(self, key_or_index) -> int:
        if isinstance(key_or_index, str):
            try:
                return self._index[key_or_index]
            except KeyError:
                raise KeyError(f"sample key {key_or_index!r} is not in store {self.url}") from None
        i = int(key_or_index)
        if not 0 <= i < self.num_images:
            raise KeyError(f"image index {i} outside store {self.url} ({self.num_images} images)")
        return i

    def has(self, key_or_index, view_id: int) -> bool:
        i = self.index_of(key_or_index)
        return 0 <= view_id < self.num_views and (i // self.shard_size) in self._done

    def read(self, key_or_index, view_id: int) -> torch.Tensor | None:
        """The dequantised grid [C, h, w] of one view, or None when the store lacks it (its shard
        is incomplete or the view is outside the plan): the caller then runs the teacher online."""
        if not self.has(key_or_index, view_id):
            return None
        i = self.index_of(key_or_index)
        # numpy, not torch: single-threaded and cheap inside data-loader workers
        x = self._chunk(0, i, view_id, self.tokens.dtype).reshape(-1, self.dim).astype(np.float32)
        if self.scale is not None:
            x *= self._chunk(1, i, view_id, np.float16).astype(np.float32)[:, None]
        return torch.from_numpy(np.ascontiguousarray(x.T).reshape(self.dim, *self.grid))

    def _chunk(self, array: int, i: int, view: int, dtype) -> np.ndarray:
        """One inner chunk by a single ranged read, the shard's index cached; valid because our
        arrays use the raw little-endian bytes codec followed by a trailing CRC-32C, checked here
        (a :class:`ViewError` "damaged" names the shard object and view)."""
        shard = i // self.shard_size
        obj = self._shard_objects(shard)[array]
        where = f"view {view} of sample {i} in {obj}"
        index = self._indexes.get((array, shard))
        if index is None:
            try:
                index = self._indexes[(array, shard)] = self._read_index(obj)
            except (OSError, ValueError) as e:
                raise ViewError("damaged", f"{where}: shard object unreadable ({type(e).__name__})") from None
        offset, nbytes = (int(x) for x in index[i - shard * self.shard_size, view])
        if offset == _MISSING:
            raise ViewError("damaged", f"{where}: chunk missing from a completed shard")
        try:
            raw = self.fs.cat_file(obj, start=offset, end=offset + nbytes)
        except (OSError, ValueError) as e:
            raise ViewError("damaged", f"{where}: unreadable ({e})") from None
        if len(raw) != nbytes or nbytes < 4 or google_crc32c.value(raw[:-4]) != int.from_bytes(raw[-4:], "little"):
            raise ViewError("damaged", f"{where}: fails its CRC-32C (damaged or truncated bytes)")
        return np.frombuffer(raw[:-4], dtype=np.dtype(dtype).newbyteorder("<"))

    def _read_index(self, obj: str) -> np.ndarray:
        """The shard object's index (``index_location="start"``): (offset, nbytes) per inner chunk,
        [shard_size, views, 2] uint64, all ones where a chunk is absent."""
        raw = self.fs.cat_file(obj, start=0, end=self.shard_size * self.num_views * 16)
        return np.frombuffer(raw, "<u8").reshape(self.shard_size, self.num_views, 2)

    def read_batch(self, keys_or_indices, view_ids) -> tuple[torch.Tensor, torch.Tensor]:
        """Grids [B, C, h, w] and a bool mask [B] of the views present (absent rows are zero)."""
        idx = [self.index_of(k) for k in keys_or_indices]
        out = torch.zeros(len(idx), self.dim, *self.grid)
        present = torch.zeros(len(idx), dtype=torch.bool)
        for row, (i, v) in enumerate(zip(idx, view_ids)):
            grid = self.read(i, int(v))
            if grid is not None:
                out[row], present[row] = grid, True
        return out, present


def require_bucket(fs, root: str, url: str) -> None:
    """On object storage, fail early, naming the URL and what to check, when the bucket is missing
    or the endpoint is unreachable (instead of creating a bucket or a deep botocore trace).
    Credentials and the endpoint come from the environment only (AWS_*, FSSPEC_S3_*)."""
    if isinstance(fs, LocalFileSystem):
        return
    bucket = root.split("/", 1)[0]
    endpoint = os.environ.get("FSSPEC_S3_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL") or "the default endpoint"
    try:
        found = fs.exists(bucket)
    except Exception as e:  # noqa: BLE001 - connection refused, bad credentials, ...
        raise StoreError(f"{url}: cannot reach the object store at {endpoint} ({type(e).__name__}: {e}). "
                         "Check the endpoint (AWS_ENDPOINT_URL or FSSPEC_S3_ENDPOINT_URL) and the credentials "
                         "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or AWS_PROFILE)") from e
    if not found:
        raise StoreError(f"{url}: bucket {bucket!r} does not exist at {endpoint} (or these credentials "
                         f"cannot see it): create it (e.g. `aws s3 mb s3://{bucket}`) or fix the URL")


def _zarr_store(url: str, fs, root: str, read_only: bool = False):
    if isinstance(fs, LocalFileSystem):
        return zarr.storage.LocalStore(root, read_only=read_only)
    return zarr.storage.FsspecStore.from_url(url, read_only=read_only)


def _read_json(fs, path: str):
    with fs.open(path, "rb") as f:
        return json.loads(f.read().decode())


def _write_json(fs, path: str, obj) -> None:
    """Atomic on local disks (temp file + rename); object-store PUTs are atomic already."""
    data = json.dumps(obj, indent=1).encode()
    fs.makedirs(os.path.dirname(path), exist_ok=True)
    if isinstance(fs, LocalFileSystem):
        with atomic_write(path) as f:
            f.write(data)
    else:
        fs.pipe_file(path, data)
