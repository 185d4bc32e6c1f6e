"""WebDataset shards of a detection dataset: a resumable writer, a map-style reader by byte range
(what the trainer streams, following the training plan), and a sequential streaming reader.

Shard layout (one tar per ``shard_size`` consecutive dataset indices, written in dataset order):
``<stem>.<ext>`` holds the image file bytes exactly as stored (no re-encoding) and ``<stem>.json``
the dataset's ``annotation(i)`` plus ``"index": i``. ``stem`` is the sample key with ``%`` and
``.`` escaped, because WebDataset splits member names at the first dot; the true key is in the
json. ``manifest.json`` lists the shards with their sample counts, the class names, the
label -> category id map and the dataset content hash (``dataset_hash``); ``index.json`` holds every
member's byte offset, so any sample can be read by its dataset index.

Training (:class:`ShardDataset`): the plan (``pipeline/data/plan.py``) names every step's samples,
so the trainer reads exactly those, by byte range through ``index.json``: a sample's two members are
adjacent in its tar, one ranged read; a step's samples go out in one concurrent round
(``fs.cat_ranges``), their mosaic partners in a second, and DataLoader workers keep the next steps in
flight. The samples are the source data set's, bit for bit (same bytes, same ``decode``), so the
plan's guarantees hold unchanged: the same batches on any world size, the exact teacher store
joined by (epoch, step, slot), mid-epoch resume. Nothing is read that the plan does not use.

Sequential passes (:class:`ShardStream`): each sample once, shards split by node then by DataLoader
worker (the WebDataset DDP practice), e.g. to score or convert a data set.
"""
from __future__ import annotations

import json
import math
import multiprocessing as mp
import random
import tarfile
import tempfile
from collections import OrderedDict
from collections.abc import Callable, Iterator
from functools import partial
from itertools import islice
from pathlib import Path
from urllib.parse import urlparse

import fsspec
import torch
import webdataset as wds
from fsspec.implementations.local import LocalFileSystem
from torch.utils.data import IterableDataset
from tqdm.auto import tqdm
from webdataset.gopen import gopen, gopen_schemes
from webdataset.tariterators import group_by_keys, tar_file_expander

from detector.checkpoint import atomic_write
from pipeline.data.augment import apply_record, sample_record
from pipeline.data.dataset import DatasetError, decode
from teacher_cache.layout import Location, require_bucket

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
class ShardDataset(torch.utils.data.Dataset):
    """Map-style access to the samples of a shard set by dataset index: ``dataset[i]`` equals the
    source data set's ``dataset[i]`` bit for bit; ``annotation(i)``, ``key(i)``, ``raw(i)``,
    ``content_hash()`` as :class:`pipeline.data.dataset.DetectionDataset`.

    Each sample is one ranged read of ``source`` (a path or any fsspec URL: ``s3://``, ``gs://``, ...)
    through ``index.json``; :meth:`prefetch` reads many in one concurrent round (what
    ``PlanDataset`` does for a step's samples and again for their mosaic partners). The bytes of the
    last ``cache_size`` samples are kept; ``io`` counts the requests and bytes read.
    """

    def __init__(self, source: str | Path, manifest: dict | None = None, cache_size: int = 256):
        self.source = str(source)
        self.manifest = manifest or load_manifest(source)
        self.location = Location(self.source)
        self.cache_size = cache_size
        self.rows = None                                   # index.json, read on first use
        self.cache: OrderedDict[int, tuple[bytes, dict]] = OrderedDict()
        self.io = {"requests": 0, "bytes": 0}

    def __getstate__(self):  # DataLoader workers: re-open the filesystem, empty caches
        return {"source": self.source, "manifest": self.manifest, "cache_size": self.cache_size}

    def __setstate__(self, state):
        self.__init__(**state)

    def __len__(self) -> int:
        return self.manifest["num_samples"]

    def __repr__(self) -> str:
        return f"ShardDataset({self.source!r}, images={len(self)}, shards={len(self.manifest['shards'])})"

    class_names = property(lambda self: self.manifest["class_names"])
    label_to_category_id = property(lambda self: self.manifest["label_to_category_id"])
    num_classes = property(lambda self: len(self.manifest["class_names"]))

    def content_hash(self) -> str:
        """The source data set's ``content_hash()`` (recorded by the writer): the plan's dataset hash."""
        return self.manifest["dataset_hash"]

    def _span(self, index: int) -> tuple[str, int, int, tuple[int, int], tuple[int, int]]:
        """(shard path, start, end, image range, json range) of a sample: one range over both members."""
        if self.rows is None:
            self.rows = read_json_url(join_url(self.source, INDEX))["shards"]
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} outside {self.source} ({len(self)} samples)")
        shard, pos = divmod(int(index), self.manifest["shard_size"])
        _, img_off, img_size, js_off, js_size = self.rows[shard][pos]
        start, end = min(img_off, js_off), max(img_off + img_size, js_off + js_size)
        name = self.manifest["shards"][shard]["name"]
        return (self.location.path(name), start, end, (img_off - start, img_off - start + img_size),
                (js_off - start, js_off - start + js_size))

    def prefetch(self, indices) -> None:
        """Read the samples not cached yet, all in one concurrent round."""
        todo = list(dict.fromkeys(int(i) for i in indices if int(i) not in self.cache))
        if not todo:
            return
        spans = [self._span(i) for i in todo]
        raws = self.location.fs.cat_ranges([s[0] for s in spans], [s[1] for s in spans], [s[2] for s in spans],
                                           on_error="return")
        self.io["requests"] += len(todo)
        for i, (path, start, end, img, js), raw in zip(todo, spans, raws):
            if isinstance(raw, Exception) or len(raw) != end - start:
                why = (f"{type(raw).__name__}: {raw}" if isinstance(raw, Exception)
                       else f"{len(raw)} of {end - start} bytes")
                raise DatasetError(f"{path}: cannot read sample {i} at bytes {start}..{end} ({why}). Fix: restore "
                                   "the shard (re-run `python -m jobs.make_shards` with the same --out) or check "
                                   "the object store")
            self.io["bytes"] += len(raw)
            self.cache[i] = (raw[img[0]:img[1]], json.loads(raw[js[0]:js[1]]))
            while len(self.cache) > self.cache_size:
                self.cache.popitem(last=False)

    def raw(self, index: int) -> tuple[bytes, dict]:
        """(encoded image bytes as stored, annotation)."""
        index = int(index)
        if index not in self.cache:
            self.prefetch([index])
        self.cache.move_to_end(index)
        return self.cache[index]

    def annotation(self, index: int) -> dict:
        return self.raw(index)[1]

    def key(self, index: int) -> str:
        return self.annotation(index)["key"]

    def __getitem__(self, index: int):
        data, annotation = self.raw(index)
        return decode(data, annotation, source=f"{self.source}#{index} ({annotation['key']})")


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
    """One sequential pass over a shard set: every sample once over all ranks x DataLoader workers
    (shards split by node, then by worker), ``(image, target)`` as the map-style data set yields it.

    Args:
        source: directory or URL prefix holding ``manifest.json`` (local, ``file://``, or fsspec).
        rank, world_size: explicit DDP coordinates; default: ``wds.split_by_node``'s view
            (``RANK``/``WORLD_SIZE`` env or torch.distributed).
        seed, shuffle_shards: permute the shard order per epoch (the same on every rank).
        policy: an ``AugPolicy``: the replayable augmentation of ``AugmentedDataset`` (record from
            (seed, epoch, index); mosaic partners read by index through :class:`ShardDataset`).
        transform: ``(image, target) -> (image, target)`` applied when there is no policy.
        url_template: shard URL from its name, e.g. ``"pipe:aws s3 cp s3://b/p/{name} -"``
            (default: ``source/name``).
    """

    def __init__(self, source: str | Path, *, rank: int | None = None, world_size: int | None = None,
                 seed: int = 0, epoch: int = 0, shuffle_shards: bool = False, policy=None,
                 transform: Callable | None = None, url_template: str | None = None):
        if (rank is None) != (world_size is None):
            raise ValueError("give both rank and world_size, or neither")
        self.source = str(source)
        self.manifest = load_manifest(source)
        self.rank, self.world_size = rank, world_size
        self.seed = seed
        self.epoch = SharedEpoch(epoch)
        self.shuffle_shards = shuffle_shards
        self.policy, self.transform = policy, transform
        names = [s["name"] for s in self.manifest["shards"]]
        self.urls = [url_template.format(name=n) if url_template else join_url(self.source, n) for n in names]
        self.partners = ShardDataset(self.source, self.manifest) if policy is not None else None

    @property
    def num_samples(self) -> int:
        return self.manifest["num_samples"]

    def set_epoch(self, epoch: int) -> None:
        self.epoch.set(epoch)

    def _nodesplitter(self):
        if self.rank is None:
            return wds.split_by_node
        return partial(_slice_by_rank, rank=self.rank, world_size=self.world_size)

    def _sample(self, sample: dict, epoch: int):
        annotation = json.loads(sample["json"])
        ext = next(k for k in sample if not k.startswith("__") and k != "json")
        image, target = decode(sample[ext], annotation, source=f"{sample['__url__']}:{annotation['key']}")
        if self.policy is not None:   # = AugmentedDataset[(epoch, index)]: the json is annotation(index)
            record = sample_record(self.seed, epoch, annotation["index"], self.policy, self.num_samples,
                                   (annotation["width"], annotation["height"]), annotation["boxes"])
            image, target = apply_record(record, image, target, load_partner=self.partners.__getitem__)
        elif self.transform is not None:
            image, target = self.transform(image, target)
        target["index"] = annotation["index"]
        return image, target

    def __iter__(self):
        epoch = self.epoch.get()
        urls = list(self.urls)
        if self.shuffle_shards:
            random.Random(wds.utils.make_seed(self.seed, epoch)).shuffle(urls)  # same on every rank
        stages = [wds.SimpleShardList(urls), self._nodesplitter(), wds.split_by_worker, _open_shards,
                  tar_file_expander, group_by_keys, wds.map(partial(self._sample, epoch=epoch))]
        return iter(wds.DataPipeline(*stages))
