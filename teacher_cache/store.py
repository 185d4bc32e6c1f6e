"""Budget store (``--views K``): K replayed views per augmented phase, one inner chunk per (image,
view), a few hundred images per shard object. The Zarr layout, the writes and the integrity story are
the ones both stores share (:mod:`teacher_cache.layout`).

Layout (a local path or any fsspec URL, e.g. s3://bucket/cache):

    manifest.json     teacher fingerprint, protocol, dataset hash, view plan, dtype, sizes
    keys.json         sample keys in index order
    zarr.json         the Zarr group
    tokens/           [N, V, h*w, C] int8 (or float16); inner chunk one view; shard (S, V, h*w, C)
    scale/            [N, V, h*w] float16 per-token scales (int8 stores only); same sharding
    done/000012.json  completion marker of shard 12, written after the shard is verified

Writes: exactly one writer per shard, whole shards in one
call (no read-modify-write), verified, then marked. A shard without a valid marker reads as absent
and is rewritten from scratch by the next run, so an interrupted job never leaves a partial shard
that reads as complete.
"""
from __future__ import annotations

import json
import os
import time

import numpy as np
import torch
import zarr

from .layout import (Location, ShardReader, StoreError, StoreMismatch, ViewError, keys_sha256, read_json,
                     require_bucket, teacher_identity, view_array, write_json, zarr_store)
from .stores import missing_manifest
from .views import ViewPlan

__all__ = ["Store", "StoreError", "StoreMismatch", "ViewError", "BUDGET_DTYPES"]

BUDGET_DTYPES = ("int8", "float16")  # the budget (K-views) store; int4 is exact-store only
FORMAT = "rtdetrv4-teacher-cache"
FORMAT_VERSION = 2   # v2: a CRC-32C per view (inner chunk)
OUR_ENTRIES = {"manifest.json", "keys.json", "zarr.json", "tokens", "scale", "done"}


class Store:
    """Reader/writer of one budget store. Create with ``Store.create``, read with ``Store.open``;
    ``read(key_or_index, view)`` returns a dequantised [C, h, w] grid or None."""

    def __init__(self, url: str, manifest: dict, keys: list[str], mode: str = "r"):
        self.url, self.manifest, self.keys = url, manifest, keys
        self.location = Location(url)
        self._index = {k: i for i, k in enumerate(keys)}
        group = zarr.open_group(store=zarr_store(self.location, read_only=mode == "r"),
                                mode="r" if mode == "r" else "r+")
        self.tokens = group["tokens"]
        self.scale = group["scale"] if self.dtype == "int8" else None
        self.reader = ShardReader(self.location)
        self._done: set[int] = set()
        self.refresh()

    # --- manifest facts -------------------------------------------------------------------
    num_images = property(lambda self: self.manifest["num_images"])
    num_views = property(lambda self: self.manifest["view_plan"]["num_views"])
    shard_size = property(lambda self: self.manifest["shard_size"])
    dtype = property(lambda self: self.manifest["dtype"])
    grid = property(lambda self: tuple(self.manifest["grid"]))
    dim = property(lambda self: self.manifest["teacher"]["embed_dim"])
    plan = property(lambda self: ViewPlan.from_dict(self.manifest["view_plan"]))
    fs = property(lambda self: self.location.fs)

    @property
    def num_shards(self) -> int:
        return -(-self.num_images // self.shard_size)

    def shard_range(self, shard: int) -> tuple[int, int]:
        return shard * self.shard_size, min((shard + 1) * self.shard_size, self.num_images)

    def bytes_per_view(self) -> int:
        h, w = self.grid
        return h * w * (self.dim + 2 if self.dtype == "int8" else 2 * self.dim)

    def _marker(self, shard: int) -> str:
        return self.location.path("done", f"{shard:06d}.json")

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
        loc = Location(url)
        fs = loc.fs
        require_bucket(fs, loc.root, url)
        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "teacher": teacher,
            "dataset": {"hash": dataset_hash, "num_images": len(keys), "keys_sha256": keys_sha256(keys)},
            "view_plan": {**plan.to_dict(), "hash": plan.hash(), "num_views": plan.num_views},
            "num_images": len(keys), "grid": list(grid), "dtype": dtype, "shard_size": shard_size,
            "layout": {"tokens": "[N, V, h*w, C]", "scale": "[N, V, h*w] fp16 (int8 only)",
                       "chunk": "one view", "shard": f"{shard_size} images x all views"},
            **(extra or {}),
        }
        if fs.exists(loc.path("manifest.json")):
            store = cls.open(url, mode="r+")
            store._check_resume(manifest)
            return store
        if fs.exists(loc.root):
            foreign = sorted(os.path.basename(p.rstrip("/")) for p in fs.ls(loc.root, detail=False))
            foreign = [p for p in foreign if p not in OUR_ENTRIES]
            if foreign:
                raise StoreError(f"{url} already holds something else ({', '.join(foreign[:5])}"
                                 f"{'...' if len(foreign) > 5 else ''}) and no teacher-cache "
                                 "manifest: choose an empty or new --out location")
            fs.rm(loc.root, recursive=True)  # an earlier creation that died before its manifest
        fs.makedirs(loc.root, exist_ok=True)
        group = zarr.open_group(store=zarr_store(loc), mode="w")
        group.attrs.update({"format": FORMAT, "format_version": FORMAT_VERSION, "dtype": dtype,
                            "decode": "tokens[i, v] * scale[i, v, :, None] (int8); tokens (float16)"})
        n, v, t = len(keys), plan.num_views, grid[0] * grid[1]
        view_array(group, "tokens", (n, v, t, teacher["embed_dim"]), (shard_size, v, t, teacher["embed_dim"]),
                   "int8" if dtype == "int8" else "float16", 0, view_dims=2)
        if dtype == "int8":
            view_array(group, "scale", (n, v, t), (shard_size, v, t), "float16", 0, view_dims=1)
        write_json(fs, loc.path("keys.json"), keys)
        manifest["created"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        write_json(fs, loc.path("manifest.json"), manifest)  # last: it makes the store a store
        return cls(url, manifest, keys, mode="r+")

    @classmethod
    def open(cls, url: str, mode: str = "r") -> "Store":
        loc = Location(url)
        require_bucket(loc.fs, loc.root, url)
        if not loc.fs.exists(loc.path("manifest.json")):
            raise missing_manifest(url)
        manifest = read_json(loc.fs, loc.path("manifest.json"))
        if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
            raise StoreError(f"{url} is not a {FORMAT} v{FORMAT_VERSION} store")
        keys = read_json(loc.fs, loc.path("keys.json"))
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

    # --- the store interface (teacher_cache.stores.TeacherStore) ------------------------------
    @property
    def precision(self) -> str:
        return self.manifest["teacher"]["protocol"]["precision"]

    def check_teacher(self, fingerprint: dict) -> None:
        self.check_compatible(teacher=fingerprint)

    def check_plan(self, plan) -> None:
        """Refuse a training plan (``pipeline.data.plan.TrainPlan``) whose input size, data set,
        augmentation phases or policy differ from the views this store replays."""
        self.check_compatible(input_size=plan.base_size, dataset_hash=plan.dataset_hash or None)
        policy = json.loads(json.dumps(plan.policy.to_dict()))   # tuples as the manifest's lists
        if tuple(self.plan.epochs) != tuple(policy["epochs"]):
            self._mismatch("augmentation phases", tuple(self.plan.epochs), tuple(policy["epochs"]))
        stored = self.manifest.get("policy")
        if stored is not None:
            diff = sorted(k for k in stored if stored[k] != policy.get(k))
            if diff:
                self._mismatch(f"augmentation policy ({', '.join(diff)})", {k: stored[k] for k in diff},
                               {k: policy.get(k) for k in diff})

    def recorded_plan(self) -> dict | None:
        return self.manifest.get("run_plan")

    def describe(self) -> str:
        k = self.plan.k
        return (f"budget teacher store {self.url} (--views {k}): each sample replays one of {k} cached views per "
                "phase instead of a fresh draw each epoch, its grid is resized to the step's size, and MixUp "
                "batches run the online teacher; an exact store (jobs.cache_teacher without --views) serves the "
                "recipe as is")

    def join(self, strict: bool) -> "BudgetJoin":
        return BudgetJoin(self, strict)

    def view_args(self, epoch: int, index: int) -> dict:
        """The record arguments of the cached view the view plan assigns to (epoch, index)."""
        return self.plan.record_args(self.plan.view_for(epoch, index))

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
        """Re-read the completion markers (cheap: one listing) and forget the cached indexes."""
        done = set()
        try:
            names = self.fs.ls(self.location.path("done"), detail=False)
        except FileNotFoundError:
            names = []
        for name in names:
            base = os.path.basename(name)
            if base.endswith(".json") and base[:-5].isdigit():
                done.add(int(base[:-5]))
        self._done = {s for s in done if s < self.num_shards and self._marker_valid(s)}
        self.reader.indexes.clear()

    def _marker_valid(self, shard: int) -> bool:
        try:
            m = read_json(self.fs, self._marker(shard))
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

    def coverage(self, epoch: int) -> str:
        """How much of the view plan the store holds (the same for every epoch)."""
        return f"{len(self._done)}/{self.num_shards} shards complete"

    # --- writing --------------------------------------------------------------------------
    def shard_objects(self, shard: int) -> list[str]:
        """The shard's objects: tokens (and scale), each holding all views of its images."""
        names = ["tokens"] + (["scale"] if self.scale is not None else [])
        return [self.location.path(name, "c", str(shard), *(["0"] * (3 if name == "tokens" else 2)))
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
        self.reader.forget(self.shard_objects(shard))
        for obj in self.shard_objects(shard):  # leftovers of an interrupted run: never patched
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
                  "bytes": int(sum(self.fs.size(o) for o in self.shard_objects(shard))),
                  "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        write_json(self.fs, self._marker(shard), marker)
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
        """Check from the shard objects' indexes (re-read) that every (image, view) chunk is present."""
        start, stop = self.shard_range(shard)
        objects = {obj: self.shard_size * self.num_views for obj in self.shard_objects(shard)}
        self.reader.forget(objects)
        errors = self.reader.load_indexes(objects)
        problems = []
        for obj in objects:
            if obj in errors:
                e = errors[obj]
                problems.append(f"shard object {obj} missing" if isinstance(e, FileNotFoundError) else str(e))
                continue
            index = self.reader.indexes[obj].reshape(self.shard_size, self.num_views, 2)
            absent = np.argwhere(index[: stop - start, :, 0] == np.uint64(2**64 - 1))
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
        is incomplete or the view is outside the plan): the caller then runs the teacher online.
        A damaged, truncated or deleted view raises :class:`ViewError` ("damaged")."""
        if not self.has(key_or_index, view_id):
            return None
        i = self.index_of(key_or_index)
        shard = i // self.shard_size
        pos, n = (i - shard * self.shard_size) * self.num_views + view_id, self.shard_size * self.num_views
        label = f"view {view_id} of sample {i}"
        raws = self.reader.read([(obj, pos, n, label) for obj in self.shard_objects(shard)])
        for raw in raws:
            if isinstance(raw, ViewError):
                raise raw
        # numpy, not torch: single-threaded and cheap inside data-loader workers
        x = np.frombuffer(raws[0], self.tokens.dtype.newbyteorder("<")).reshape(-1, self.dim).astype(np.float32)
        if self.scale is not None:
            x *= np.frombuffer(raws[1], "<f2").astype(np.float32)[:, None]
        return torch.from_numpy(np.ascontiguousarray(x.T).reshape(self.dim, *self.grid))

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


class BudgetJoin:
    """Worker side of a budget store: per ``(epoch, step, slot, index)`` item the planned view's grid
    (``teacher``), or why it is not served (``teacher_miss``: a view failing its CRC-32C is "damaged";
    with ``strict`` a StoreError stops the run)."""

    def __init__(self, store: Store, strict: bool):
        self.store, self.strict = store, strict
        self.plan = store.plan

    def __call__(self, items) -> list[dict]:
        out = []
        for epoch, _, _, index in items:
            try:
                out.append({"teacher": self.store.read(index, self.plan.view_for(epoch, index))})
            except ViewError as e:
                if self.strict:
                    raise StoreError(f"--strict-cache: {e}") from None
                out.append({"teacher": None, "teacher_miss": e.kind, "teacher_error": str(e)})
        return out
