"""Exact-mode teacher store: the teacher's output for every (epoch, global step, slot) of a training
plan, each at its step's own grid (multi-scale 15x15 .. 25x25, MixUp included), in Zarr v3.

The store is keyed by the plan (its hash: dataset, recipe, seed, global batch), not by the
student, so every run that follows the same plan reuses it. Layout (a path or fsspec URL), on the
conventions both stores share (:mod:`teacher_cache.layout`):

    manifest.json        format, teacher fingerprint, plan (dict + hash), dataset, dtype, grids
    keys.json            sample keys in index order
    zarr.json            the Zarr group (``zarr.open_group(url)`` shows the arrays below)
    grid                 int16 [E, steps, 2]: the step's teacher grid (h, w); 0 where not written
    sample               int32 [E, steps, G]: the data-set index of each slot; -1 where not written
    tokens/20x20         one array per grid the plan uses: [E, steps, G, h*w, C] int8 (float16;
                         uint8 = two int4 codes per byte, C/2); shard = one global step (1, 1, G, h*w, C),
                         inner chunk = one view
    scale/20x20          the views' scales: [E, steps, G, h*w] float16 (int8); [.., h*w, C/128] (int4)
    done/e0007/b000012.json   block 12 of epoch 7 (steps [12*S, 13*S), --steps-per-block S) is written

A step's views all live in the array of its grid, so no view is padded; the arrays of other grids
hold no object for that step. One writer writes a block: each step's shard objects whole (one
atomic PUT / rename each), the block's ``grid`` and ``sample`` chunks, reads them back, then the
marker. Readers serve only marked blocks; a flipped, truncated or deleted byte of a marked block
reads as a damaged view, never as a wrong target. Views travel to the trainer quantised; they are
dequantised on the training device (:func:`teacher_cache.quantize.decode`).

With plain Zarr: ``g = zarr.open_group(url, mode="r"); h, w = g["grid"][e, s];
tokens = g[f"tokens/{h}x{w}"][e, s, k]; scale = g[f"scale/{h}x{w}"][e, s, k]`` (int8: the grid is
``tokens * scale[:, None]``, token-major, h*w rows of C channels).
"""
from __future__ import annotations

import json
import time

import numpy as np
import torch
import zarr

from .layout import (Location, ShardReader, StoreError, StoreMismatch, ViewError, checked_array, chunk_payload,
                     keys_sha256, read_json, require_bucket, teacher_identity, view_array, write_json, zarr_store)
from .quantize import DTYPES, INT4_GROUP, bytes_per_token
from .stores import missing_manifest

__all__ = ["ExactStore", "StoreError", "StoreMismatch", "ViewError", "FORMAT"]

FORMAT = "rtdetrv4-teacher-cache-exact"
FORMAT_VERSION = 2   # v2: Zarr v3 (v1 was a hand-written binary format)
MISS_RETRY_S = 10.0  # a block not marked yet is looked for again after this long
_TOKENS = {"int8": "int8", "int4": "uint8", "float16": "float16"}


def grid_name(grid) -> str:
    """The name of a grid's arrays: ``tokens/20x20``, ``scale/20x20``."""
    return f"{int(grid[0])}x{int(grid[1])}"


class ExactStore:
    """One exact store: ``create`` / ``open``; ``write_block`` (the cache job); ``read`` / ``read_many``
    (the trainer's DataLoader workers: quantised views, checksums checked); ``verify_block``;
    ``completed_blocks`` / ``epoch_complete`` / ``coverage``."""

    def __init__(self, url: str, manifest: dict, keys: list[str], storage_options: dict | None = None):
        self.url, self.manifest, self.keys = url, manifest, keys
        self.location = Location(url, storage_options)
        self.reader = ShardReader(self.location)
        self._blocks: dict[tuple[int, int], dict | float] = {}   # block -> its grid/sample rows, or miss time
        self._group = None                                        # opened by writers and verify only

    def __getstate__(self):  # DataLoader workers: re-open the filesystem, start with empty caches
        return {"url": self.url, "manifest": self.manifest, "keys": self.keys,
                "storage_options": self.location.storage_options}

    def __setstate__(self, state):
        self.__init__(**state)

    # --- manifest facts -------------------------------------------------------------------
    plan = property(lambda self: self.manifest["plan"])
    plan_hash = property(lambda self: self.manifest["plan_hash"])
    epochs = property(lambda self: self.manifest["epochs"])
    steps_per_epoch = property(lambda self: self.manifest["steps_per_epoch"])
    global_batch = property(lambda self: self.manifest["global_batch"])
    steps_per_block = property(lambda self: self.manifest["steps_per_block"])
    dtype = property(lambda self: self.manifest["dtype"])
    dim = property(lambda self: self.manifest["teacher"]["embed_dim"])
    grids = property(lambda self: [tuple(g) for g in self.manifest["grids"]])

    @property
    def blocks_per_epoch(self) -> int:
        return -(-self.steps_per_epoch // self.steps_per_block)

    def block_steps(self, block: int) -> range:
        return range(block * self.steps_per_block, min((block + 1) * self.steps_per_block, self.steps_per_epoch))

    def block_name(self, epoch: int, block: int) -> str:
        steps = self.block_steps(block)
        return f"block e{epoch:04d}/b{block:06d} (steps {steps.start}..{steps.stop - 1})"

    def view_bytes(self, grid: tuple[int, int]) -> int:
        return grid[0] * grid[1] * bytes_per_token(self.dtype, self.dim)

    def _marker(self, epoch: int, block: int) -> str:
        return self.location.path("done", f"e{epoch:04d}", f"b{block:06d}.json")

    def _side_chunks(self, epoch: int, block: int) -> list[str]:
        return [self.location.path(name, "c", str(epoch), str(block), "0") for name in ("grid", "sample")]

    def step_objects(self, epoch: int, step: int, grid) -> list[str]:
        """The shard objects of one step: its views' tokens (and scales)."""
        name = grid_name(grid)
        objects = [self.location.path("tokens", name, "c", str(epoch), str(step), "0", "0", "0")]
        if self.dtype != "float16":
            objects.append(self.location.path("scale", name, "c", str(epoch), str(step),
                                              *(["0", "0"] if self.dtype == "int8" else ["0", "0", "0"])))
        return objects

    # --- create / open --------------------------------------------------------------------
    @classmethod
    def create(cls, url: str, *, teacher: dict, plan: dict, plan_hash: str, epochs: int, steps_per_epoch: int,
               global_batch: int, dataset_hash: str, keys: list[str], grids, dtype: str = "int8",
               steps_per_block: int = 8, extra: dict | None = None, storage_options: dict | None = None):
        """Create a store, or re-open the same one to continue it (refused by name if it differs).
        ``grids``: every teacher grid (h, w) the plan's steps use (one array each)."""
        if dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {DTYPES}, got {dtype!r}")
        loc = Location(url, storage_options)
        fs = loc.fs
        require_bucket(fs, loc.root, url)
        grids = sorted({(int(h), int(w)) for h, w in grids})
        manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "teacher": teacher, "plan": plan,
                    "plan_hash": plan_hash, "epochs": epochs, "steps_per_epoch": steps_per_epoch,
                    "global_batch": global_batch, "steps_per_block": steps_per_block, "dtype": dtype,
                    "grids": [list(g) for g in grids],
                    "dataset": {"hash": dataset_hash, "num_images": len(keys), "keys_sha256": keys_sha256(keys)},
                    **(extra or {})}
        if fs.exists(loc.path("manifest.json")):
            store = cls.open(url, storage_options=storage_options)
            store.check_teacher(teacher)
            store.check_plan(plan_hash)
            for field in ("dtype", "steps_per_block", "dataset", "grids"):
                if store.manifest[field] != manifest[field]:
                    store._mismatch(field, store.manifest[field], manifest[field])
            return store
        if fs.exists(loc.root) and fs.ls(loc.root, detail=False):
            raise StoreError(f"{url} already holds something else and no teacher-cache manifest: choose an "
                             "empty or new --out location")
        fs.makedirs(loc.root, exist_ok=True)
        group = zarr.open_group(store=zarr_store(loc), mode="w")
        group.attrs.update({"format": FORMAT, "format_version": FORMAT_VERSION, "dtype": dtype,
                            "decode": "h, w = grid[e, s]; tokens/{h}x{w}[e, s, k] * scale/{h}x{w}[e, s, k][:, None] "
                                      "(int8; int4: teacher_cache.quantize.decode)"})
        S, G, C = steps_per_block, global_batch, teacher["embed_dim"]
        checked_array(group, "grid", (epochs, steps_per_epoch, 2), (1, S, 2), "int16", 0)
        checked_array(group, "sample", (epochs, steps_per_epoch, G), (1, S, G), "int32", -1)
        for h, w in grids:
            t = h * w
            row = C // 2 if dtype == "int4" else C
            view_array(group, f"tokens/{h}x{w}", (epochs, steps_per_epoch, G, t, row), (1, 1, G, t, row),
                       _TOKENS[dtype], 0, view_dims=2)
            if dtype == "int8":
                view_array(group, f"scale/{h}x{w}", (epochs, steps_per_epoch, G, t), (1, 1, G, t), "float16", 0,
                           view_dims=1)
            elif dtype == "int4":
                g = C // INT4_GROUP
                view_array(group, f"scale/{h}x{w}", (epochs, steps_per_epoch, G, t, g), (1, 1, G, t, g), "float16",
                           0, view_dims=2)
        write_json(fs, loc.path("keys.json"), keys)
        manifest["created"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        write_json(fs, loc.path("manifest.json"), manifest)  # last: it makes the location a store
        return cls(url, manifest, keys, storage_options)

    @classmethod
    def open(cls, url: str, storage_options: dict | None = None) -> "ExactStore":
        loc = Location(url, storage_options)
        require_bucket(loc.fs, loc.root, url)
        if not loc.fs.exists(loc.path("manifest.json")):
            raise missing_manifest(url)
        manifest = read_json(loc.fs, loc.path("manifest.json"))
        if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
            raise StoreError(f"{url} is not a {FORMAT} v{FORMAT_VERSION} store (format "
                             f"{manifest.get('format')} v{manifest.get('format_version')}): rebuild it with "
                             "`python -m jobs.cache_teacher` into a new --out")
        keys = read_json(loc.fs, loc.path("keys.json"))
        if keys_sha256(keys) != manifest["dataset"]["keys_sha256"]:
            raise StoreError(f"{url}: keys.json does not match its manifest (damaged store)")
        return cls(url, manifest, keys, storage_options)

    @property
    def group(self) -> zarr.Group:
        if self._group is None:
            self._group = zarr.open_group(store=zarr_store(self.location), mode="r+")
        return self._group

    # --- compatibility --------------------------------------------------------------------
    def _mismatch(self, what: str, stored, requested):
        raise StoreMismatch(f"teacher-feature store {self.url} was made for another {what}: the store has "
                            f"{stored!r}, this run needs {requested!r}. Build a matching store with "
                            "`python -m jobs.cache_teacher` (new --out) or point to one that matches")

    def check_teacher(self, fingerprint: dict) -> None:
        """Refuse another teacher (name, architecture, weights, protocol) by name."""
        mine, theirs = teacher_identity(self.manifest["teacher"]), teacher_identity(fingerprint)
        for field in ("name", "arch", "weights_sha256", "protocol"):
            if mine[field] != theirs[field]:
                what = f"teacher ({field})"
                if field == "weights_sha256":
                    what += (f" - the store was built from {self.manifest['teacher'].get('weights_source')}, "
                             f"this run's teacher is {fingerprint.get('weights_source')}")
                self._mismatch(what, mine[field], theirs[field])

    def check_plan(self, plan) -> None:
        """Refuse another training plan (a ``TrainPlan`` or its hash), naming the fields that differ."""
        plan_hash = plan if isinstance(plan, str) else plan.hash()
        if plan_hash != self.plan_hash:
            stored = self.manifest["plan"]
            mine = {} if isinstance(plan, str) else plan.to_dict()
            diff = sorted(k for k in mine if k in stored and stored[k] != mine[k])
            what = (f"{', '.join(f'{k} {stored[k]!r}' for k in diff)}; this run has "
                    f"{', '.join(f'{k} {mine[k]!r}' for k in diff)}") if diff else \
                ", ".join(f"{k}={stored[k]}" for k in ("num_samples", "global_batch", "epochs", "seed", "mixup_group")
                          if k in stored)
            self._mismatch(f"training plan ({what}; see the store's manifest.json 'plan')", self.plan_hash, plan_hash)

    # --- the store interface (teacher_cache.stores.TeacherStore) ------------------------------
    @property
    def precision(self) -> str:
        return self.manifest["teacher"]["protocol"]["precision"]

    def recorded_plan(self) -> dict | None:
        return self.manifest.get("run_plan")

    def describe(self) -> str:
        return f"exact teacher store {self.url} (plan {self.plan_hash}, {self.steps_per_epoch} steps per epoch stored)"

    def join(self, strict: bool) -> "ExactJoin":
        return ExactJoin(self, strict)

    def view_args(self, epoch: int, index: int) -> None:
        return None   # the plan's own record: the store holds the teacher's output on exactly that view

    # --- writing --------------------------------------------------------------------------
    def write_block(self, epoch: int, block: int, views: list[tuple]) -> int:
        """``views``: ``(step, slot, index, tokens, scale | None, (h, w))`` for every slot of every
        step of the block, numpy arrays as :func:`teacher_cache.quantize.encode` returns them.
        Writes each step's shard objects whole, the block's grid and sample chunks, reads them
        back, then the marker; returns the bytes written."""
        steps, G = self.block_steps(block), self.global_batch
        want = {(s, k) for s in steps for k in range(G)}
        got = {(int(v[0]), int(v[1])) for v in views}
        if got != want or len(views) != len(want):
            raise ValueError(f"{self.block_name(epoch, block)}: got {len(views)} views, the plan has "
                             f"{len(want)} ({len(want - got)} missing)")
        by_step = {s: sorted((v for v in views if int(v[0]) == s), key=lambda v: int(v[1])) for s in steps}
        grid = np.zeros((self.steps_per_block, 2), np.int16)
        sample = np.full((self.steps_per_block, G), -1, np.int32)
        for s, rows in by_step.items():
            shapes = {tuple(int(x) for x in v[5]) for v in rows}
            if len(shapes) != 1 or next(iter(shapes)) not in self.grids:
                raise ValueError(f"{self.block_name(epoch, block)} step {s}: grids {sorted(shapes)}, the store holds "
                                 f"one grid per step out of {self.grids}")
            grid[s - steps.start] = next(iter(shapes))
            sample[s - steps.start] = [int(v[2]) for v in rows]
        marker = self._marker(epoch, block)
        if self.location.fs.exists(marker):   # a rebuild: readers see the block as missing meanwhile
            self.location.fs.rm_file(marker)
        self._blocks.pop((epoch, block), None)
        objects = {}
        for s, rows in by_step.items():
            name = grid_name(grid[s - steps.start])
            tokens = np.stack([np.asarray(v[3]) for v in rows]).astype(_TOKENS[self.dtype], copy=False)
            self.group[f"tokens/{name}"][epoch, s] = tokens
            if self.dtype != "float16":
                self.group[f"scale/{name}"][epoch, s] = np.stack([np.asarray(v[4]) for v in rows]).astype(np.float16)
            objects.update({o: G for o in self.step_objects(epoch, s, grid[s - steps.start])})
        n = len(steps)
        self.group["grid"][epoch, steps.start:steps.stop] = grid[:n]
        self.group["sample"][epoch, steps.start:steps.stop] = sample[:n]
        nbytes = self._check_written(epoch, block, objects, by_step)
        write_json(self.location.fs, marker, {"epoch": epoch, "block": block, "steps": [steps.start, steps.stop],
                                              "plan_hash": self.plan_hash,
                                              "weights_sha256": self.manifest["teacher"]["weights_sha256"],
                                              "bytes": nbytes,
                                              "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        return nbytes

    def _check_written(self, epoch: int, block: int, objects: dict[str, int], by_step: dict) -> int:
        """Read the block back (every index, the side chunks, one view per step): its bytes, or a
        StoreError naming what failed (then no marker is written and the block is redone)."""
        self.reader.forget(objects)
        errors = self.reader.load_indexes(objects)
        problems = [f"{p}: {e}" for p, e in errors.items()]
        nbytes = 0
        for path, index in self.reader.indexes.items():
            if path in objects:
                present = index[:, 0] != np.uint64(2**64 - 1)
                if not present.all():
                    problems.append(f"{path}: {int((~present).sum())} views missing")
                nbytes += int((index[present, 0] + index[present, 1]).max()) if present.any() else 0
        side = self.reader.fetch(self._side_chunks(epoch, block))
        nbytes += sum(len(b) for b in side if isinstance(b, bytes))
        try:
            self._blocks[(epoch, block)] = self._side_rows(epoch, block, side)
            for s, rows in by_step.items():
                got = self.read_many([(epoch, s, 0, int(rows[0][2]))])[0]
                if isinstance(got, ViewError):
                    problems.append(str(got))
                elif not np.array_equal(got[0].numpy(), np.asarray(rows[0][3]).astype(_TOKENS[self.dtype], copy=False)):
                    problems.append(f"step {s} slot 0 read back differs")
        except ViewError as e:
            problems.append(str(e))
        self._blocks.pop((epoch, block), None)   # it was read before its marker exists
        if problems:
            raise StoreError(f"{self.block_name(epoch, block)} of {self.url} failed verification after writing: "
                             f"{'; '.join(problems[:3])}")
        return nbytes

    # --- completion -----------------------------------------------------------------------
    def completed_blocks(self, epoch: int) -> set[int]:
        try:
            names = self.location.fs.ls(self.location.path("done", f"e{epoch:04d}"), detail=False)
        except FileNotFoundError:
            return set()
        done = set()
        for name in names:
            base = name.rstrip("/").rsplit("/", 1)[-1]
            if base.startswith("b") and base.endswith(".json") and base[1:-5].isdigit():
                done.add(int(base[1:-5]))
        return {b for b in done if b < self.blocks_per_epoch}

    def epoch_complete(self, epoch: int) -> bool:
        return len(self.completed_blocks(epoch)) == self.blocks_per_epoch

    def coverage(self, epoch: int) -> str:
        """How much of ``epoch`` the store holds (for the run's start-up summary)."""
        return f"{len(self.completed_blocks(epoch))}/{self.blocks_per_epoch} blocks of epoch {epoch} written"

    # --- reading --------------------------------------------------------------------------
    def _block(self, epoch: int, block: int) -> dict:
        """The block's per-step grids and per-slot samples, once its marker exists (cached)."""
        cached = self._blocks.get((epoch, block))
        if isinstance(cached, dict):
            return cached
        name = self.block_name(epoch, block)
        if isinstance(cached, float) and time.monotonic() - cached < MISS_RETRY_S:
            raise ViewError("missing", f"{name} of {self.url} is not written yet")
        marker, *side = self.reader.fetch([self._marker(epoch, block), *self._side_chunks(epoch, block)])
        if isinstance(marker, FileNotFoundError):
            self._blocks[(epoch, block)] = time.monotonic()
            raise ViewError("missing", f"{name} of {self.url} is not written yet (no completion marker)")
        try:
            m = json.loads(marker) if isinstance(marker, bytes) else {}
        except ValueError:
            m = {}
        weights = self.manifest["teacher"]["weights_sha256"]
        if m.get("plan_hash") != self.plan_hash or m.get("weights_sha256") != weights:
            raise ViewError("damaged", f"{name} of {self.url}: its marker is unreadable or belongs to another "
                                       "plan or teacher")
        rows = self._blocks[(epoch, block)] = self._side_rows(epoch, block, side)
        return rows

    def _side_rows(self, epoch: int, block: int, raws: list) -> dict:
        """The block's ``grid`` [S, 2] and ``sample`` [S, G] chunks from their objects' bytes, checked."""
        rows = {}
        for array, raw, shape, dtype in zip(("grid", "sample"), raws, ((self.steps_per_block, 2),
                                            (self.steps_per_block, self.global_batch)), ("<i2", "<i4")):
            where = f"{self.block_name(epoch, block)}: chunk {array}/c/{epoch}/{block}/0"
            if not isinstance(raw, bytes):
                raise ViewError("damaged", f"{where} missing or unreadable ({type(raw).__name__})")
            payload = chunk_payload(raw, where)
            if len(payload) != int(np.prod(shape)) * np.dtype(dtype).itemsize:
                raise ViewError("damaged", f"{where} has the wrong size")
            rows[array] = np.frombuffer(payload, dtype).reshape(shape)
        return rows

    def read(self, epoch: int, step: int, slot: int, index: int | None = None):
        """The quantised view ``(tokens, scale | None, (h, w))`` as CPU tensors (decoded on the
        device by the caller); raises :class:`ViewError` naming the block, object and view."""
        got = self.read_many([(epoch, step, slot, index)])[0]
        if isinstance(got, ViewError):
            raise got
        return got

    def read_many(self, items) -> list:
        """``items``: ``(epoch, step, slot, index | None)``; per item the view as :meth:`read` returns
        it, or its :class:`ViewError`. The views' byte ranges go out in one concurrent round."""
        out: list = [None] * len(items)
        requests, owners = [], []
        for r, (epoch, step, slot, index) in enumerate(items):
            label = f"view (epoch {epoch}, step {step}, slot {slot})"
            try:
                rows = self._block(epoch, step // self.steps_per_block)
            except ViewError as e:
                out[r] = ViewError(e.kind, f"{label}: {e}")
                continue
            at = step - (step // self.steps_per_block) * self.steps_per_block
            grid, held = tuple(int(x) for x in rows["grid"][at]), int(rows["sample"][at, slot])
            if grid not in self.grids:
                out[r] = ViewError("damaged", f"{label}: its block records grid {grid}, not one of the store's")
            elif index is not None and held != index:
                out[r] = ViewError("damaged", f"{label} holds sample {held}, the plan says {index}: the store does "
                                              "not follow this run's plan")
            else:
                objects = self.step_objects(epoch, step, grid)
                requests += [(o, slot, self.global_batch, label) for o in objects]
                owners.append((r, len(objects), grid))
        raws, i = self.reader.read(requests), 0
        for r, n, grid in owners:
            parts, i = raws[i:i + n], i + n
            bad = next((p for p in parts if isinstance(p, ViewError)), None)
            out[r] = bad if bad is not None else self._decode(parts, grid)
        return out

    def _decode(self, parts: list[bytes], grid: tuple[int, int]):
        t, dim = grid[0] * grid[1], self.dim
        row = dim // 2 if self.dtype == "int4" else dim
        tokens = np.frombuffer(parts[0], np.dtype(_TOKENS[self.dtype]).newbyteorder("<")).reshape(t, row)
        scale = None
        if self.dtype != "float16":
            scale = np.frombuffer(parts[1], "<f2")
            scale = scale.reshape(t, -1) if self.dtype == "int4" else scale
        return (torch.from_numpy(tokens.astype(tokens.dtype.newbyteorder("="))),
                None if scale is None else torch.from_numpy(scale.astype(np.float16)), grid)

    def verify_block(self, epoch: int, block: int) -> tuple[list[str], int]:
        """Re-read every view of one block (indexes and CRC-32C): (problems naming block, object and
        view, views read). A block without its marker is a problem too (not written)."""
        self._blocks.pop((epoch, block), None)
        try:
            rows = self._block(epoch, block)
        except ViewError as e:
            return [str(e)], 0
        steps = self.block_steps(block)
        self.reader.forget([o for s in steps for o in self.step_objects(epoch, s, rows["grid"][s - steps.start])])
        got = self.read_many([(epoch, s, k, None) for s in steps for k in range(self.global_batch)])
        problems = [str(g) for g in got if isinstance(g, ViewError)]
        return problems, len(got) - len(problems)


class ExactJoin:
    """Worker side of an exact store: the quantised view of each ``(epoch, step, slot, index)`` item
    (``teacher_tokens``/``teacher_scale``/``teacher_grid``, CPU), or why it is not served
    (``teacher_miss``: "missing" or "damaged"; with ``strict`` a StoreError stops the run)."""

    def __init__(self, store: ExactStore, strict: bool):
        self.store, self.strict = store, strict

    def __call__(self, items) -> list[dict]:
        out = []
        for got in self.store.read_many(items):   # the views of a rank's step, read in one concurrent round
            if isinstance(got, ViewError):
                if self.strict:
                    raise StoreError(f"--strict-cache: {got}") from None
                out.append({"teacher_miss": got.kind, "teacher_error": str(got)})
                continue
            tokens, scale, grid = got
            out.append({"teacher_tokens": tokens, "teacher_grid": grid}
                       | ({} if scale is None else {"teacher_scale": scale}))
        return out
