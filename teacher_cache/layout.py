"""The Zarr v3 layout both teacher stores share (exact: ``exact.py``; budget: ``store.py``), and
their one integrity story.

A store is a directory or object-store prefix holding

    manifest.json   what the store is: format, teacher fingerprint, plan, dtype, sizes
    keys.json       the data set's sample keys in index order
    zarr.json       a Zarr v3 group: any Zarr v3 reader opens the store with ``zarr.open_group``
    tokens/ scale/  sharded arrays (``ShardingCodec``): inner chunk = one teacher view with codecs
                    bytes + crc32c; the shard index at the start of the object, bytes + crc32c
    done/           completion markers, written once the shard objects they cover are verified

Integrity: one writer writes a shard object whole (atomic rename on a local disk, one PUT on object
storage), and only what a marker covers is served. A view of a marked shard whose object was
deleted, truncated or has a flipped byte (in its index or in the view) raises
``ViewError("damaged")`` here, and a plain Zarr read of the same bytes raises too (crc32c): a
damaged chunk is a damaged view, never a wrong target.

Reads take the path the sharding spec allows: each shard object's index is read once and cached,
then one ranged read per view (adjacent views coalesced), so one view is read without its shard;
on object storage the ranges of many views go out concurrently (``fs.cat_ranges``).
"""
from __future__ import annotations

import hashlib
import json
import os

import fsspec
import google_crc32c
import numpy as np
import zarr
from fsspec.implementations.local import LocalFileSystem
from zarr.codecs import BytesCodec, Crc32cCodec, ShardingCodec

from detector.checkpoint import atomic_write

MISSING = 2**64 - 1   # the sharding index's offset and length of an absent inner chunk


class StoreError(ValueError):
    """The location is not a usable store (missing, foreign content, damaged)."""


class ViewError(StoreError):
    """One view cannot be served: ``kind`` is "missing" (not written yet) or "damaged"."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


class StoreMismatch(StoreError):
    """The store was made for another teacher, resolution, plan, dataset or dtype."""


def keys_sha256(keys: list[str]) -> str:
    return hashlib.sha256("\n".join(keys).encode()).hexdigest()


def teacher_identity(fingerprint: dict) -> dict:
    """What makes two teachers' targets interchangeable (precision is within 0.999 cosine)."""
    proto = {k: v for k, v in fingerprint["protocol"].items() if k not in ("precision", "bf16_fidelity")}
    return {"name": fingerprint["name"], "arch": fingerprint["arch"],
            "weights_sha256": fingerprint["weights_sha256"], "protocol": proto}


class Location:
    """A local path or fsspec URL and its filesystem. The filesystem is made again in a forked
    DataLoader worker: fsspec's async filesystems (s3fs, gcsfs) refuse to run after a fork."""

    def __init__(self, url: str, storage_options: dict | None = None):
        self.url, self.storage_options = str(url), dict(storage_options or {})
        self._fs, root = fsspec.core.url_to_fs(self.url, **self.storage_options)
        self.root = root.rstrip("/")
        self._pid = os.getpid()

    def __getstate__(self):
        return {"url": self.url, "storage_options": self.storage_options}

    def __setstate__(self, state):
        self.__init__(**state)

    @property
    def fs(self):
        if self._pid != os.getpid():
            self._fs, self._pid = fsspec.core.url_to_fs(self.url, **self.storage_options)[0], os.getpid()
        return self._fs

    @property
    def local(self) -> bool:
        return isinstance(self.fs, LocalFileSystem)

    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])


def zarr_store(location: Location, read_only: bool = False):
    if location.local:
        return zarr.storage.LocalStore(location.root, read_only=read_only)
    return zarr.storage.FsspecStore.from_url(location.url, read_only=read_only,
                                             storage_options=location.storage_options or None)


def view_array(group, name: str, shape: tuple, shard: tuple, dtype: str, fill_value, view_dims: int) -> zarr.Array:
    """A sharded array whose inner chunk is one view (its last ``view_dims`` axes), each with a
    CRC-32C, and the shard index (with its own CRC-32C) at the start of every shard object."""
    inner = (1,) * (len(shape) - view_dims) + tuple(shape[-view_dims:])
    codec = ShardingCodec(chunk_shape=inner, codecs=[BytesCodec(), Crc32cCodec()],
                          index_codecs=[BytesCodec(), Crc32cCodec()], index_location="start")
    return group.create_array(name, shape=shape, dtype=dtype, chunks=shard, serializer=codec, compressors=None,
                              fill_value=fill_value, config={"write_empty_chunks": True})


def checked_array(group, name: str, shape: tuple, chunks: tuple, dtype: str, fill_value) -> zarr.Array:
    """A small unsharded side array whose every chunk carries a CRC-32C (bytes + crc32c)."""
    return group.create_array(name, shape=shape, dtype=dtype, chunks=chunks, serializer=BytesCodec(),
                              compressors=[Crc32cCodec()], fill_value=fill_value,
                              config={"write_empty_chunks": True})


def chunk_payload(raw: bytes, where: str) -> bytes:
    """A chunk's bytes without its trailing CRC-32C, checked (``ViewError`` "damaged" naming ``where``)."""
    if len(raw) < 4 or google_crc32c.value(raw[:-4]) != int.from_bytes(raw[-4:], "little"):
        raise ViewError("damaged", f"{where}: fails its CRC-32C (damaged or truncated bytes)")
    return raw[:-4]


class ShardReader:
    """Views out of shard objects by ranged reads: each object's index read once (its CRC-32C
    checked) and cached, then the views' byte ranges, adjacent ones merged, fetched in one
    concurrent round. Counts its requests and bytes (``io``)."""

    def __init__(self, location: Location):
        self.location = location
        self.indexes: dict[str, np.ndarray] = {}
        self.io = {"requests": 0, "bytes": 0}

    def __getstate__(self):   # a DataLoader worker starts with empty caches
        return {"location": self.location}

    def __setstate__(self, state):
        self.__init__(**state)

    def forget(self, paths) -> None:
        for p in paths:
            self.indexes.pop(p, None)

    def _cat(self, paths: list[str], starts: list[int], ends: list[int]) -> list:
        if not paths:
            return []
        out = self.location.fs.cat_ranges(paths, starts, ends, on_error="return")
        self.io["requests"] += len(paths)
        self.io["bytes"] += sum(len(b) for b in out if isinstance(b, bytes))
        return out

    def fetch(self, paths: list[str]) -> list:
        """Whole small objects (markers, side-array chunks) in one concurrent round: bytes or the error."""
        return self._cat(paths, [None] * len(paths), [None] * len(paths))

    def load_indexes(self, objects: dict[str, int]) -> dict[str, Exception]:
        """Read the indexes of ``{path: inner chunks per shard}`` not cached yet; returns the errors."""
        todo = [p for p in objects if p not in self.indexes]
        errors = {}
        for path, raw in zip(todo, self._cat(todo, [0] * len(todo), [objects[p] * 16 + 4 for p in todo])):
            if isinstance(raw, Exception):
                errors[path] = raw
            elif len(raw) != objects[path] * 16 + 4:
                errors[path] = ViewError("damaged", f"shard object {path} is truncated (its index is incomplete)")
            else:
                try:
                    payload = chunk_payload(raw, f"the index of shard object {path}")
                except ViewError as e:
                    errors[path] = e
                    continue
                self.indexes[path] = np.frombuffer(payload, "<u8").reshape(-1, 2)
        return errors

    def read(self, requests: list[tuple[str, int, int, str]]) -> list:
        """``requests``: ``(object path, inner chunk position, chunks per shard, label)``; returns per
        request the view's payload bytes, or a ``ViewError("damaged")`` naming its label and object."""
        errors = self.load_indexes({path: n for path, _, n, _ in requests})
        out: list = [None] * len(requests)
        spans = []
        for r, (path, pos, _, label) in enumerate(requests):
            if path in errors:
                e = errors[path]
                why = "shard object missing" if isinstance(e, FileNotFoundError) else str(e)
                out[r] = ViewError("damaged", f"{label} in {path}: {why}")
                continue
            offset, nbytes = (int(x) for x in self.indexes[path][pos])
            if offset == MISSING:
                out[r] = ViewError("damaged", f"{label} in {path}: missing from its written shard object")
            else:
                spans.append((path, offset, offset + nbytes, r))
        merged = _merge(spans)
        for (path, start, end, members), raw in zip(merged, self._cat([m[0] for m in merged], [m[1] for m in merged],
                                                                      [m[2] for m in merged])):
            for s, e, r in members:
                label = f"{requests[r][3]} in {path}"
                if isinstance(raw, Exception):
                    out[r] = ViewError("damaged", f"{label}: unreadable ({type(raw).__name__}: {raw})")
                    continue
                try:
                    out[r] = chunk_payload(raw[s - start:e - start], label)
                except ViewError as err:
                    out[r] = err
        return out


def _merge(spans):
    """Ranges of one object that touch are read as one: ``[(path, start, end, [(s, e, request)])]``."""
    merged = []
    for path, s, e, r in sorted(spans):
        if merged and merged[-1][0] == path and merged[-1][2] == s:
            merged[-1][2] = e
            merged[-1][3].append((s, e, r))
        else:
            merged.append([path, s, e, [(s, e, r)]])
    return merged


def read_json(fs, path: str):
    with fs.open(path, "rb") as f:
        return json.loads(f.read().decode())


def write_json(fs, path: str, obj) -> None:
    """Atomic on local disks (temp file + rename); object-store PUTs are atomic already."""
    data = json.dumps(obj, indent=1).encode()
    fs.makedirs(os.path.dirname(path), exist_ok=True)
    if isinstance(fs, LocalFileSystem):
        with atomic_write(path) as f:
            f.write(data)
    else:
        fs.pipe_file(path, data)


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
