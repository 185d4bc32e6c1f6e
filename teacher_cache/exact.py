"""Exact-mode teacher store: the teacher's output for every (epoch, global step, slot) of a
training plan, each at its step's own grid (multi-scale 15x15 .. 25x25, MixUp included).

The store is keyed by the plan (its hash: dataset, recipe, seed, global batch), not by the
student, so every run that follows the same plan reuses it. Layout (a path or fsspec URL):

    manifest.json            format, teacher fingerprint, plan (dict + hash), dataset, dtype, shape
    keys.json                sample keys in index order
    e0007/s000012.bin        epoch 7, steps [12*S, 13*S): one file per shard, written in one go

A shard file is ``MAGIC | u64 header length | u32 crc32(header) | JSON header | view payloads``;
the header lists per view ``[step, slot, index, h, w, offset, nbytes, crc32]`` (offset from the
end of the header). One writer per
shard and one atomic PUT / rename per file, so a file that exists is complete; a reader checks
the header's and every view's CRC-32, so flipped, truncated or missing bytes read as a damaged
or missing view (never as a wrong target). Views travel to the trainer quantised; they are
dequantised on the training device (:func:`teacher_cache.quantize.decode`).
"""
from __future__ import annotations

import json
import struct
import time
import zlib

import fsspec
import numpy as np
import torch
from fsspec.implementations.local import LocalFileSystem

from detector.checkpoint import atomic_write

from .quantize import DTYPES, bytes_per_token
from .store import StoreError, StoreMismatch, ViewError, _read_json, _write_json, keys_sha256, teacher_identity

FORMAT = "rtdetrv4-teacher-cache-exact"
FORMAT_VERSION = 1
MAGIC = b"RTDCX001"
_PREFIX = struct.Struct("<8sQI")
_NP = {"int8": np.int8, "int4": np.uint8, "float16": np.float16}
MISS_RETRY_S = 10.0  # a shard not there yet is looked for again after this long



class ExactStore:
    def __init__(self, url: str, manifest: dict, keys: list[str], storage_options: dict | None = None):
        self.url, self.manifest, self.keys = url, manifest, keys
        self.storage_options = storage_options or {}
        self.fs, self.root = fsspec.core.url_to_fs(url, **self.storage_options)
        self._headers: dict[tuple[int, int], dict | float] = {}

    def __getstate__(self):  # DataLoader workers: re-open the filesystem, start with empty caches
        return {"url": self.url, "manifest": self.manifest, "keys": self.keys,
                "storage_options": self.storage_options}

    def __setstate__(self, state):
        self.__init__(**state)

    # --- manifest facts -------------------------------------------------------------------
    plan = property(lambda self: self.manifest["plan"])
    plan_hash = property(lambda self: self.manifest["plan_hash"])
    epochs = property(lambda self: self.manifest["epochs"])
    steps_per_epoch = property(lambda self: self.manifest["steps_per_epoch"])
    global_batch = property(lambda self: self.manifest["global_batch"])
    steps_per_shard = property(lambda self: self.manifest["steps_per_shard"])
    dtype = property(lambda self: self.manifest["dtype"])
    dim = property(lambda self: self.manifest["teacher"]["embed_dim"])

    @property
    def shards_per_epoch(self) -> int:
        return -(-self.steps_per_epoch // self.steps_per_shard)

    def shard_steps(self, shard: int) -> range:
        return range(shard * self.steps_per_shard, min((shard + 1) * self.steps_per_shard, self.steps_per_epoch))

    def shard_name(self, epoch: int, shard: int) -> str:
        return f"e{epoch:04d}/s{shard:06d}.bin"

    def _path(self, name: str) -> str:
        return f"{self.root.rstrip('/')}/{name}"

    def view_bytes(self, grid: tuple[int, int]) -> int:
        return grid[0] * grid[1] * bytes_per_token(self.dtype, self.dim)

    # --- create / open --------------------------------------------------------------------
    @classmethod
    def create(cls, url: str, *, teacher: dict, plan: dict, plan_hash: str, epochs: int, steps_per_epoch: int,
               global_batch: int, dataset_hash: str, keys: list[str], dtype: str = "int8",
               steps_per_shard: int = 8, extra: dict | None = None, storage_options: dict | None = None):
        """Create a store, or re-open the same one to continue it (refused by name if it differs)."""
        if dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {DTYPES}, got {dtype!r}")
        fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
        manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "teacher": teacher, "plan": plan,
                    "plan_hash": plan_hash, "epochs": epochs, "steps_per_epoch": steps_per_epoch,
                    "global_batch": global_batch, "steps_per_shard": steps_per_shard, "dtype": dtype,
                    "dataset": {"hash": dataset_hash, "num_images": len(keys), "keys_sha256": keys_sha256(keys)},
                    **(extra or {})}
        if fs.exists(f"{root}/manifest.json"):
            store = cls.open(url, storage_options=storage_options)
            store.check_teacher(teacher)
            store.check_plan(plan_hash)
            for field in ("dtype", "steps_per_shard", "dataset"):
                if store.manifest[field] != manifest[field]:
                    store._mismatch(field, store.manifest[field], manifest[field])
            return store
        if fs.exists(root) and fs.ls(root, detail=False):
            raise StoreError(f"{url} already holds something else and no teacher-cache manifest: choose an "
                             "empty or new --out location")
        fs.makedirs(root, exist_ok=True)
        _write_json(fs, f"{root}/keys.json", keys)
        manifest["created"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        _write_json(fs, f"{root}/manifest.json", manifest)  # last: it makes the location a store
        return cls(url, manifest, keys, storage_options)

    @classmethod
    def open(cls, url: str, storage_options: dict | None = None) -> "ExactStore":
        fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
        if not fs.exists(f"{root}/manifest.json"):
            raise StoreError(f"no teacher-feature store at {url} (manifest.json missing): run "
                             "`python -m jobs.cache_teacher --out ...` first")
        manifest = _read_json(fs, f"{root}/manifest.json")
        if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
            raise StoreError(f"{url} is not a {FORMAT} v{FORMAT_VERSION} store")
        keys = _read_json(fs, f"{root}/keys.json")
        if keys_sha256(keys) != manifest["dataset"]["keys_sha256"]:
            raise StoreError(f"{url}: keys.json does not match its manifest (damaged store)")
        return cls(url, manifest, keys, storage_options)

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

    def check_plan(self, plan_hash: str) -> None:
        if plan_hash != self.plan_hash:
            stored = self.manifest["plan"]
            self._mismatch("training plan (dataset, recipe, seed, global batch, MixUp group; see the store's "
                           f"manifest.json 'plan': {', '.join(f'{k}={stored[k]}' for k in ('num_samples', 'global_batch', 'epochs', 'seed', 'mixup_group') if k in stored)})",
                           self.plan_hash, plan_hash)

    # --- writing --------------------------------------------------------------------------
    def write_shard(self, epoch: int, shard: int, views: list[tuple]) -> int:
        """``views``: ``(step, slot, index, tokens, scale | None, (h, w))`` for every slot of every
        step of the shard, numpy arrays as :func:`teacher_cache.quantize.encode` returns them.
        One file in one write; returns its bytes."""
        want = {(s, k) for s in self.shard_steps(shard) for k in range(self.global_batch)}
        got = {(int(v[0]), int(v[1])) for v in views}
        if got != want or len(views) != len(want):
            raise ValueError(f"shard {self.shard_name(epoch, shard)}: got {len(views)} views, the plan has "
                             f"{len(want)} ({len(want - got)} missing)")
        entries, payload, offset = [], [], 0
        for step, slot, index, tokens, scale, (h, w) in sorted(views, key=lambda v: (v[0], v[1])):
            raw = np.ascontiguousarray(tokens, _NP[self.dtype]).tobytes()
            raw += b"" if scale is None else np.ascontiguousarray(scale, np.float16).tobytes()
            entries.append([int(step), int(slot), int(index), int(h), int(w), offset, len(raw), zlib.crc32(raw)])
            payload.append(raw)
            offset += len(raw)
        header = json.dumps({"epoch": epoch, "shard": shard, "plan_hash": self.plan_hash,
                             "weights_sha256": self.manifest["teacher"]["weights_sha256"],
                             "dtype": self.dtype, "dim": self.dim, "views": entries}).encode()
        data = _PREFIX.pack(MAGIC, len(header), zlib.crc32(header)) + header + b"".join(payload)
        path = self._path(self.shard_name(epoch, shard))
        if isinstance(self.fs, LocalFileSystem):
            with atomic_write(path) as f:
                f.write(data)
        else:
            self.fs.pipe_file(path, data)
        self._headers.pop((epoch, shard), None)
        return len(data)

    # --- completion -----------------------------------------------------------------------
    def completed_shards(self, epoch: int) -> set[int]:
        try:
            names = self.fs.ls(self._path(f"e{epoch:04d}"), detail=False)
        except FileNotFoundError:
            return set()
        done = set()
        for name in names:
            base = name.rstrip("/").rsplit("/", 1)[-1]
            if base.startswith("s") and base.endswith(".bin") and base[1:-4].isdigit():
                done.add(int(base[1:-4]))
        return {s for s in done if s < self.shards_per_epoch}

    def epoch_complete(self, epoch: int) -> bool:
        return len(self.completed_shards(epoch)) == self.shards_per_epoch

    # --- reading --------------------------------------------------------------------------
    def _header(self, epoch: int, shard: int) -> dict:
        name = self.shard_name(epoch, shard)
        cached = self._headers.get((epoch, shard))
        if isinstance(cached, dict):
            return cached
        if isinstance(cached, float) and time.monotonic() - cached < MISS_RETRY_S:
            raise ViewError("missing", f"shard {name} of {self.url} is not written yet")
        path = self._path(name)
        try:
            prefix = self.fs.cat_file(path, start=0, end=_PREFIX.size)
        except FileNotFoundError:
            self._headers[(epoch, shard)] = time.monotonic()
            raise ViewError("missing", f"shard {name} of {self.url} is not written yet (or was deleted)") from None
        if len(prefix) < _PREFIX.size:
            raise ViewError("damaged", f"shard {name} of {self.url} is truncated ({len(prefix)} bytes)")
        magic, n, crc = _PREFIX.unpack(prefix)
        raw = self.fs.cat_file(path, start=_PREFIX.size, end=_PREFIX.size + n) if magic == MAGIC else b""
        if magic != MAGIC or len(raw) != n or zlib.crc32(raw) != crc:
            raise ViewError("damaged", f"shard {name} of {self.url}: header damaged or truncated "
                                       "(checksum mismatch)")
        header = json.loads(raw)
        if header["plan_hash"] != self.plan_hash or header["weights_sha256"] != self.manifest["teacher"]["weights_sha256"]:
            raise ViewError("damaged", f"shard {name} of {self.url} belongs to another plan or teacher")
        header["index"] = {(e[0], e[1]): e for e in header["views"]}
        header["base"] = _PREFIX.size + n
        self._headers[(epoch, shard)] = header
        return header

    def read(self, epoch: int, step: int, slot: int, index: int | None = None):
        """The quantised view ``(tokens, scale | None, (h, w))`` as CPU tensors (decoded on the
        device by the caller); raises :class:`ViewError` naming the shard and view."""
        shard = step // self.steps_per_shard
        header = self._header(epoch, shard)
        name = f"shard {self.shard_name(epoch, shard)} view (epoch {epoch}, step {step}, slot {slot})"
        entry = header["index"].get((step, slot))
        if entry is None:
            raise ViewError("damaged", f"{name} of {self.url} is not in its shard's header")
        _, _, idx, h, w, offset, nbytes, crc = entry
        offset += header["base"]
        if index is not None and idx != index:
            raise ViewError("damaged", f"{name} holds sample {idx}, the plan says {index}: the store "
                                       "does not follow this run's plan")
        try:
            raw = self.fs.cat_file(self._path(self.shard_name(epoch, shard)), start=offset, end=offset + nbytes)
        except FileNotFoundError:
            self._headers.pop((epoch, shard), None)
            raise ViewError("missing", f"{name} of {self.url}: the shard was deleted") from None
        if len(raw) != nbytes:
            raise ViewError("damaged", f"{name} of {self.url} is truncated ({len(raw)} of {nbytes} bytes)")
        if zlib.crc32(raw) != crc:
            raise ViewError("damaged", f"{name} of {self.url} fails its checksum (damaged bytes)")
        return self._decode_raw(raw, h, w)

    def _decode_raw(self, raw: bytes, h: int, w: int):
        t, dim = h * w, self.dim
        if self.dtype == "int8":
            tokens = np.frombuffer(raw, np.int8, t * dim).reshape(t, dim)
            scale = np.frombuffer(raw, np.float16, t, offset=t * dim)
        elif self.dtype == "int4":
            groups = (bytes_per_token("int4", dim) - dim // 2) // 2
            tokens = np.frombuffer(raw, np.uint8, t * dim // 2).reshape(t, dim // 2)
            scale = np.frombuffer(raw, np.float16, t * groups, offset=t * dim // 2).reshape(t, groups)
        else:
            tokens, scale = np.frombuffer(raw, np.float16, t * dim).reshape(t, dim), None
        return (torch.from_numpy(tokens.copy()), None if scale is None else torch.from_numpy(scale.copy()), (h, w))

    def verify_shard(self, epoch: int, shard: int) -> tuple[list[str], int]:
        """Re-read every view of one shard: (problems naming shard and view, views read)."""
        try:
            header = self._header(epoch, shard)
        except ViewError as e:
            return [str(e)], 0
        problems, n = [], 0
        want = {(s, k) for s in self.shard_steps(shard) for k in range(self.global_batch)}
        if set(header["index"]) != want:
            problems.append(f"shard {self.shard_name(epoch, shard)}: {len(want - set(header['index']))} views "
                            "of the plan are not in it")
        for step, slot, index, *_ in header["views"]:
            try:
                self.read(epoch, step, slot, index)
                n += 1
            except ViewError as e:
                problems.append(str(e))
        return problems, n

    def bytes_on_disk(self) -> int:
        return int(sum(self.fs.du(self._path(f"e{e:04d}"), total=True) for e in range(self.epochs)
                       if self.fs.exists(self._path(f"e{e:04d}"))))
