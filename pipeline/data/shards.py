"""WebDataset shards of a detection dataset: a resumable writer and a DDP-aware streaming reader.

Shard layout (one tar per ``shard_size`` consecutive dataset indices, written in dataset order):
``<stem>.<ext>`` holds the image file bytes exactly as stored (no re-encoding) and ``<stem>.json``
the dataset's ``annotation(i)`` plus ``"index": i``. ``stem`` is the sample key with ``%`` and
``.`` escaped, because WebDataset splits member names at the first dot; the true key is in the
json. ``manifest.json`` lists the shards with their sample counts, the class names, the
label -> category id map and the dataset content hash (``dataset_hash``); ``index.json`` holds every member's byte
offset so that mosaic partners can be read by dataset index (local path or seekable fsspec URL).

The reader (:class:`ShardStream`) yields exactly what the map-style pipeline yields for the same
sample: ``pipeline.data.dataset.decode`` on the same bytes (identical pixels), then either a plain
``transform`` or the replayable augmentation of ``pipeline.data.augment`` drawn from
``(seed, epoch, index)`` as ``AugmentedDataset`` does. Shard splitting follows the WebDataset DDP
practice: split by node (``wds.split_by_node``, or explicit ``rank``/``world_size``), then by
DataLoader worker; ``mode="train"`` resamples shards (``wds.ResampledShards``) and cuts
equal-length epochs (``with_epoch``'s count, taken before the sample shuffle) so every rank yields
the same number of samples;
``mode="exact"`` is one pass over every sample exactly once (evaluation, tests).
"""
from __future__ import annotations

import json
import math
import multiprocessing as mp
import os
import random
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from functools import partial
from itertools import islice
from pathlib import Path
from urllib.parse import urlparse

import fsspec
import webdataset as wds
from fsspec.implementations.local import LocalFileSystem
from torch.utils.data import IterableDataset, get_worker_info
from tqdm.auto import tqdm
from webdataset.gopen import gopen, gopen_schemes
from webdataset.tariterators import group_by_keys, tar_file_expander

from detector.checkpoint import atomic_write
from pipeline.data.dataset import DatasetError, decode
from teacher_cache.store import require_bucket

FORMAT = "rtdetrv4-shards-v1"
MANIFEST = "manifest.json"
INDEX = "index.json"


# ---------------------------------------------------------------------------------------- writer
def shard_name(k: int) -> str:
    return f"shard-{k:06d}.tar"


def member_stem(key: str) -> str:
    """Tar member stem of a sample key (WebDataset cuts the key at the first dot of the name)."""
    return key.replace("%", "%25").replace(".", "%2E")


def _index_tar(f) -> list[list]:
    """[[ext, image offset, image size, json offset, json size], ...] of a shard (an open binary
    file), in sample order."""
    rows, current = [], {}
    with tarfile.open(fileobj=f) as tar:
        for m in tar:
            stem, ext = m.name.split(".", 1)
            if current and current["stem"] != stem:
                rows.append(current)
                current = {}
            current["stem"] = stem
            current[ext if ext == "json" else "image"] = (m.offset_data, m.size, ext)
    if current:
        rows.append(current)
    return [[r["image"][2], r["image"][0], r["image"][1], r["json"][0], r["json"][1]] for r in rows]


def _manifest_header(dataset, shard_size: int) -> dict:
    return {
        "format": FORMAT,
        "source": str(getattr(dataset, "source", "")),
        "dataset_hash": dataset.content_hash(),
        "num_samples": len(dataset),
        "shard_size": shard_size,
        "class_names": list(dataset.class_names),
        "label_to_category_id": list(dataset.label_to_category_id),
    }


def write_shards(dataset, out_dir: str | Path, shard_size: int = 1000, progress: bool = True) -> dict:
    """Write ``dataset`` as WebDataset shards under ``out_dir`` (a path or an fsspec URL such as
    ``s3://bucket/prefix``); returns the manifest.

    Resumable: a shard is written to a temp file and renamed (local) or uploaded in one PUT
    (object storage) when complete; complete shards already present are kept (and re-indexed).
    Refuses to mix shards of a different dataset or shard size in one directory.
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    out = str(out_dir)
    fs, root = fsspec.core.url_to_fs(out)
    local = isinstance(fs, LocalFileSystem)
    if not local:
        require_bucket(fs, root, out)
    fs.makedirs(root, exist_ok=True)
    header = _manifest_header(dataset, shard_size)
    manifest_path = f"{root}/{MANIFEST}"
    if fs.isfile(manifest_path):
        old = json.loads(fs.cat_file(manifest_path))
        for field in ("format", "dataset_hash", "num_samples", "shard_size"):
            if old.get(field) != header[field]:
                raise DatasetError(
                    f"{join_url(out, MANIFEST)}: existing shards have {field}={old.get(field)!r}, this run "
                    f"{header[field]!r}. Fix: write to a new --out directory or delete {out}.")
    fs.pipe_file(manifest_path, json.dumps({**header, "complete": False}, indent=1).encode())

    n = len(dataset)
    num_shards = math.ceil(n / shard_size)
    shards, index = [], []
    bar = tqdm(total=n, desc=f"shards -> {out}", unit="img", disable=not progress)
    for k in range(num_shards):
        lo, hi = k * shard_size, min(n, (k + 1) * shard_size)
        path = f"{root}/{shard_name(k)}"
        if not fs.isfile(path):
            if local:
                for stale in fs.glob(f"{path}.tmp*") + fs.glob(f"{root}/.{shard_name(k)}.tmp-*"):
                    fs.rm_file(stale)   # the temp file of an interrupted run
                with atomic_write(path) as f:
                    _write_tar(f, dataset, lo, hi)
            else:   # object stores have no rename: build locally, then one atomic PUT
                with tempfile.NamedTemporaryFile(suffix=".tar") as tmp:
                    _write_tar(tmp, dataset, lo, hi)
                    tmp.flush()
                    fs.put_file(tmp.name, path)
        with fs.open(path, "rb") as f:
            rows = _index_tar(f)
        if len(rows) != hi - lo:
            raise DatasetError(f"{join_url(out, shard_name(k))}: holds {len(rows)} samples, expected {hi - lo}. "
                               f"Fix: delete the file and run again to rewrite it.")
        shards.append({"name": shard_name(k), "count": len(rows), "first_index": lo})
        index.append(rows)
        bar.update(hi - lo)
    bar.close()
    fs.pipe_file(f"{root}/{INDEX}", json.dumps({"shard_size": shard_size, "shards": index}).encode())
    manifest = {**header, "complete": True, "num_shards": num_shards, "shards": shards}
    fs.pipe_file(manifest_path, json.dumps(manifest, indent=1).encode())
    return manifest


def _write_tar(f, dataset, lo: int, hi: int) -> None:
    with wds.TarWriter(f, encoder=False, mtime=0.0) as sink:
        for i in range(lo, hi):
            data, annotation = dataset.raw(i)
            ext = dataset.image_path(i).suffix.lstrip(".").lower() or "jpg"
            sink.write({"__key__": member_stem(annotation["key"]), ext: data,
                        "json": json.dumps({**annotation, "index": i}).encode()})


def is_shard_set(source: str | Path | None) -> bool:
    """True when ``source`` (a path or fsspec URL) holds a ``jobs.make_shards`` manifest."""
    if source is None:
        return False
    if _is_local(str(source)):
        return Path(str(source).removeprefix("file://"), MANIFEST).is_file()
    fs, root = fsspec.core.url_to_fs(str(source))
    require_bucket(fs, root, str(source))
    return fs.isfile(f"{root.rstrip('/')}/{MANIFEST}")


# ----------------------------------------------------------------------------------- locations
def _is_local(url: str) -> bool:
    return urlparse(url).scheme in ("", "file")


def join_url(base: str, name: str) -> str:
    return str(Path(base) / name) if _is_local(base) and not base.startswith("file:") else f"{base.rstrip('/')}/{name}"


def open_url(url: str, mode: str = "rb"):
    """A stream for a shard location: local path, ``pipe:`` or a wds scheme, else fsspec (s3://, gs://, ...)."""
    scheme = urlparse(url).scheme
    if _is_local(url) or url.startswith("pipe:") or scheme in gopen_schemes:
        return gopen(url, mode)
    return fsspec.open(url, mode).open()


def read_json_url(url: str) -> dict:
    try:
        with open_url(url) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise DatasetError(f"{url}: cannot read ({e}). Fix: run `python -m jobs.make_shards --out DIR` "
                           "first, or point to the directory that holds manifest.json.") from e


def load_manifest(source: str | Path) -> dict:
    manifest = read_json_url(join_url(str(source), MANIFEST))
    if manifest.get("format") != FORMAT or not manifest.get("complete"):
        raise DatasetError(f"{join_url(str(source), MANIFEST)}: not a complete {FORMAT} shard set. "
                           "Fix: run `python -m jobs.make_shards` again with the same --out to finish it.")
    return manifest


# ------------------------------------------------------------------------------ random access
class ShardIndex:
    """Random access by dataset index into the shards (byte offsets from ``index.json``).

    Used for mosaic partners, which the augmentation record names by dataset index. Reads the
    shards at ``source`` (a path or a seekable fsspec URL) even when the stream itself uses a
    ``pipe:`` ``url_template``.
    """

    def __init__(self, source: str | Path, manifest: dict | None = None):
        self.source = str(source)
        self.manifest = manifest or load_manifest(source)
        self._rows = None
        self._files: dict[str, object] = {}

    def __getstate__(self):  # open files and the big index stay out of worker pickles
        return {**self.__dict__, "_rows": None, "_files": {}}

    def __len__(self) -> int:
        return self.manifest["num_samples"]

    def _read(self, url: str, offset: int, size: int) -> bytes:
        f = self._files.get(url)
        if f is None:
            plain_path = urlparse(url).scheme == ""
            f = self._files[url] = open(url, "rb") if plain_path else fsspec.open(url, "rb").open()
        f.seek(offset)
        return f.read(size)

    def raw(self, index: int) -> tuple[bytes, dict]:
        if self._rows is None:
            self._rows = read_json_url(join_url(self.source, INDEX))["shards"]
        size = self.manifest["shard_size"]
        shard, pos = divmod(int(index), size)
        _, img_off, img_size, js_off, js_size = self._rows[shard][pos]
        url = join_url(self.source, self.manifest["shards"][shard]["name"])
        return self._read(url, img_off, img_size), json.loads(self._read(url, js_off, js_size))

    def __getitem__(self, index: int):
        data, annotation = self.raw(index)
        return decode(data, annotation, source=f"{self.source}#{index}")


# ------------------------------------------------------------------------------------- reader
def _open_shards(src: Iterator[dict]) -> Iterator[dict]:
    for item in src:
        yield {**item, "stream": open_url(item["url"])}


def _slice_by_rank(src, rank: int, world_size: int):
    """``wds.split_by_node`` with an explicit rank and world size."""
    yield from islice(src, rank, None, world_size)


class SharedEpoch:
    """Epoch counter shared with DataLoader workers (persistent workers see ``set_epoch`` too)."""

    def __init__(self, epoch: int = 0):
        self.value = mp.Value("i", epoch)

    def set(self, epoch: int) -> None:
        self.value.value = epoch

    def get(self) -> int:
        return self.value.value


class ShardStream(IterableDataset):
    """Streams ``(image, target)`` from shards, DDP- and worker-split, deterministic per seed.

    Args:
        source: directory or URL prefix holding ``manifest.json`` (local, ``file://``, or fsspec).
        mode: ``"exact"``: each sample once per epoch over all ranks x workers (shards split by
            node then worker; ranks may get unequal counts). ``"train"``: shards resampled with
            replacement within the rank's part of an epoch-seeded shard permutation, ``samples_per_epoch``
            samples per rank split evenly over workers (equal-length epochs on every rank).
        rank, world_size: explicit DDP coordinates; default: ``wds.split_by_node``'s view
            (``RANK``/``WORLD_SIZE`` env or torch.distributed).
        seed: base seed; shard order, resampling and sample shuffle use (seed, epoch, rank, worker).
        samples_per_epoch: samples per rank per epoch in train mode (default: ceil(N / world)).
        shuffle_buffer: sample shuffle buffer per worker (0: no sample shuffle; train default 256).
        shuffle_shards: in exact mode, permute the shard order per epoch (same on every rank).
        policy: an ``AugPolicy``: apply the replayable augmentation of ``AugmentedDataset``
            (record from (seed, epoch, index); mosaic partners read via :class:`ShardIndex`).
        transform: ``(image, target) -> (image, target)`` applied when there is no augmentation.
        record_fn: ``(epoch, index, annotation) -> AugRecord`` replacing the default record
            ``sample_record(seed, epoch, index, ...)``, e.g. the cached teacher view of ``ViewPlan``.
        join: ``(key, target) -> dict`` merged into each target after augmentation, in the worker
            after the shuffle (e.g. cached teacher features; ``target["index"]`` and
            ``target["record_epoch"]``, the epoch whose record was applied, identify the view).
        url_template: shard URL from its name, e.g. ``"pipe:aws s3 cp s3://b/p/{name} -"``
            (default: ``source/name``).
    """

    def __init__(self, source: str | Path, mode: str = "exact", *, rank: int | None = None,
                 world_size: int | None = None, seed: int = 0, epoch: int = 0,
                 samples_per_epoch: int | None = None, shuffle_buffer: int | None = None,
                 shuffle_shards: bool = False, policy=None, transform: Callable | None = None,
                 record_fn: Callable | None = None, join: Callable[[str, dict], dict] | None = None,
                 url_template: str | None = None):
        if mode not in ("exact", "train"):
            raise ValueError(f"mode must be 'exact' or 'train', got {mode!r}")
        if (rank is None) != (world_size is None):
            raise ValueError("give both rank and world_size, or neither")
        self.source = str(source)
        self.manifest = load_manifest(source)
        self.mode = mode
        self.rank, self.world_size = rank, world_size
        self.seed = seed
        self.epoch = SharedEpoch(epoch)
        self.samples_per_epoch = samples_per_epoch
        # the buffer holds encoded samples (~160 kB each for COCO)
        self.shuffle_buffer = (256 if mode == "train" else 0) if shuffle_buffer is None else shuffle_buffer
        self.shuffle_shards = shuffle_shards
        self.policy, self.transform, self.record_fn, self.join = policy, transform, record_fn, join
        names = [s["name"] for s in self.manifest["shards"]]
        self.urls = [url_template.format(name=n) if url_template else join_url(self.source, n) for n in names]
        self.augment = policy is not None or record_fn is not None
        self.partners = ShardIndex(self.source, self.manifest) if self.augment else None

    # -- bookkeeping ------------------------------------------------------------------------
    @property
    def num_samples(self) -> int:
        return self.manifest["num_samples"]

    @property
    def class_names(self) -> list[str]:
        return self.manifest["class_names"]

    @property
    def label_to_category_id(self) -> list[int]:
        return self.manifest["label_to_category_id"]

    def set_epoch(self, epoch: int) -> None:
        self.epoch.set(epoch)

    def _coordinates(self) -> tuple[int, int, int, int]:
        rank, world, worker, workers = wds.utils.pytorch_worker_info()
        if self.rank is not None:
            rank, world = self.rank, self.world_size
        info = get_worker_info()
        if info is not None:
            worker, workers = info.id, info.num_workers
        return rank, world, worker, workers

    def epoch_length(self, world_size: int | None = None) -> int:
        """Samples per rank per epoch in train mode."""
        world = world_size or self.world_size or wds.utils.pytorch_worker_info()[1]
        return self.samples_per_epoch or math.ceil(self.num_samples / world)

    # -- stages -----------------------------------------------------------------------------
    def _nodesplitter(self):
        if self.rank is None:
            return wds.split_by_node
        return partial(_slice_by_rank, rank=self.rank, world_size=self.world_size)

    def _shard_source(self, epoch: int, rank: int, world: int, worker: int):
        urls = list(self.urls)
        if self.mode == "train" or self.shuffle_shards:
            random.Random(wds.utils.make_seed(self.seed, epoch)).shuffle(urls)  # same on every rank
        if self.mode == "exact":
            return [wds.SimpleShardList(urls), self._nodesplitter(), wds.split_by_worker]
        mine = list(self._nodesplitter()(urls)) if len(urls) >= world else urls
        seed = wds.utils.make_seed(self.seed, epoch, rank, worker)
        return [wds.ResampledShards(mine, seed=seed, worker_seed=lambda: 0, deterministic=True)]

    def _sample(self, sample: dict, epoch: int):
        annotation = json.loads(sample["json"])
        ext = next(k for k in sample if not k.startswith("__") and k != "json")
        image, target = decode(sample[ext], annotation, source=f"{sample['__url__']}:{annotation['key']}")
        if self.augment:
            image, target = self._augment(image, target, annotation, epoch)
        elif self.transform is not None:
            image, target = self.transform(image, target)
        target["index"], target["record_epoch"] = annotation["index"], epoch
        if self.join is not None:
            target.update(self.join(annotation["key"], target))
        return image, target

    def _augment(self, image, target, annotation, epoch):
        """``AugmentedDataset``'s item for (epoch, index); the record lands in target["record"]."""
        from pipeline.data.augment import apply_record, sample_record

        if self.record_fn is not None:
            record = self.record_fn(epoch, annotation["index"], annotation)
        else:  # = augment.record_for: the json annotation is the dataset's annotation(index)
            record = sample_record(self.seed, epoch, annotation["index"], self.policy, self.num_samples,
                                   (annotation["width"], annotation["height"]), annotation["boxes"])
        return apply_record(record, image, target, load_partner=self.partners.__getitem__)

    def __iter__(self):
        epoch = self.epoch.get()
        rank, world, worker, workers = self._coordinates()
        stages = self._shard_source(epoch, rank, world, worker)
        stages += [_open_shards, tar_file_expander, group_by_keys]
        if self.mode == "train":
            # with_epoch, placed before the shuffle: the buffer drains at the epoch end instead of
            # being dropped, so no encoded sample is read without being used
            n = self.epoch_length(world)
            stages.append(wds.slice(n // workers + (worker < n % workers)))
        if self.shuffle_buffer:
            rng = random.Random(wds.utils.make_seed(self.seed, epoch, rank, worker, 1))
            stages.append(wds.shuffle(self.shuffle_buffer, initial=max(1, self.shuffle_buffer // 2), rng=rng))
        stages.append(wds.map(partial(self._sample, epoch=epoch)))
        return iter(wds.DataPipeline(*stages))
