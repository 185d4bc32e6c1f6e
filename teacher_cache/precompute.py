"""Run a teacher over every planned view and fill a store, one whole shard at a time.

Ray Data streams the work (cache_prior_art.md section 6.3): rows are images of the shards still
to do; CPU tasks decode each image once and render all its planned views (``render(index, view)``
-> uint8 [3, H, W], supplied by the job, which owns the data pipeline); an actor pool of teacher
workers (one GPU each when present) runs the teacher and quantises; the driver gathers rows in
order into shard buffers and hands each complete shard to ``Store.write_shard`` (one writer per
shard, whole shards, marker last). Shards with a valid marker are skipped, so a re-run only fills
the holes. ``executor="local"`` runs the same steps in-process, without Ray.
"""
from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .quantize import encode
from .store import Store
from .teachers import build_teacher


@dataclass(frozen=True)
class TeacherSpec:
    """How every worker builds the same teacher (checked against the store's weights hash)."""
    vfm: str
    weights: str | None = None
    precision: str = "fp32"
    model_kwargs: dict = field(default_factory=dict)

    def build(self, device: str | torch.device = "cpu"):
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the driver already warned about random init
            return build_teacher(self.vfm, self.weights, self.precision, **self.model_kwargs).to(device)


@dataclass
class Report:
    shards_total: int = 0
    shards_written: int = 0
    shards_skipped: int = 0
    shards_failed: int = 0
    views: int = 0
    seconds: float = 0.0
    bytes_written: int = 0
    failures: dict = field(default_factory=dict)  # shard -> first error

    @property
    def views_per_s(self) -> float:
        return self.views / self.seconds if self.seconds else 0.0

    @property
    def bytes_per_view(self) -> float:
        return self.bytes_written / self.views if self.views else 0.0

    def summary(self) -> str:
        lines = [f"shards: {self.shards_written} written, {self.shards_skipped} skipped (already "
                 f"complete), {self.shards_failed} failed, of {self.shards_total}",
                 f"views: {self.views} in {self.seconds:.1f} s = {self.views_per_s:.2f} views/s; "
                 f"{self.bytes_per_view:,.0f} bytes per view on disk"]
        lines += [f"FAILED shard {s}: {e}" for s, e in sorted(self.failures.items())]
        if self.failures:
            lines.append("failed shards have no completion marker; fix the cause and re-run the same "
                         "command: completed shards are kept and only the missing ones are computed")
        return "\n".join(lines)


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


class RenderViews:
    """CPU stage: image rows -> one row per planned view (decode once, all views)."""

    def __init__(self, render, num_views: int, input_size: tuple[int, int]):
        self.render, self.num_views, self.shape = render, num_views, (3, *input_size)

    def __call__(self, batch: dict) -> dict:
        out = {"shard": [], "index": [], "view": [], "image": [], "error": []}
        for shard, index in zip(batch["shard"], batch["index"]):
            for view in range(self.num_views):
                try:
                    image, error = self.render(int(index), view), ""
                except Exception as e:  # noqa: BLE001 - reported per shard, never written
                    image, error = None, f"image {int(index)} view {view}: {type(e).__name__}: {e}"
                out["shard"].append(int(shard))
                out["index"].append(int(index))
                out["view"].append(view)
                out["image"].append(image)
                out["error"].append(error)
        out["image"] = np.stack([im if im is not None else np.zeros(self.shape, np.uint8)
                                 for im in out["image"]])
        return {k: np.asarray(v) if k != "image" else v for k, v in out.items()}


class TeacherWorker:
    """GPU (or CPU) stage: rendered uint8 views -> stored token rows (+ int8 scales)."""

    def __init__(self, spec: TeacherSpec, dtype: str, weights_sha256: str | None = None):
        self.device = _device()
        self.teacher = spec.build(self.device)
        self.dtype = dtype
        if weights_sha256 is not None and self.teacher.weights_sha256() != weights_sha256:
            raise RuntimeError(f"worker teacher weights {self.teacher.weights_sha256()[:12]} differ from "
                               f"the store's {weights_sha256[:12]}: is {spec.weights} the same file on "
                               "every node?")

    def __call__(self, batch: dict) -> dict:
        images = torch.from_numpy(np.ascontiguousarray(batch["image"])).to(self.device)
        grids = self.teacher(images.float().div_(255.0))
        tokens, scale = encode(grids, self.dtype)
        out = {k: batch[k] for k in ("shard", "index", "view", "error")}
        out["tokens"] = tokens.cpu().numpy()
        if scale is not None:
            out["scale"] = scale.cpu().numpy()
        return out


class _ShardBuffers:
    """Driver side: gathers view rows into whole shards, writes each shard when it is full."""

    def __init__(self, store: Store, report: Report, pool: ThreadPoolExecutor):
        self.store, self.report, self.pool = store, report, pool
        self.open: dict[int, dict] = {}
        self.futures = []

    def add(self, batch: dict) -> int:
        store = self.store
        for row in range(len(batch["shard"])):
            shard, index, view = int(batch["shard"][row]), int(batch["index"][row]), int(batch["view"][row])
            buf = self.open.get(shard)
            if buf is None:
                start, stop = store.shard_range(shard)
                n, v = stop - start, store.num_views
                buf = self.open[shard] = {
                    "tokens": np.empty((n, v, *store.tokens.shape[2:]), store.tokens.dtype),
                    "scale": None if store.scale is None else np.empty((n, v, store.scale.shape[2]), np.float16),
                    "left": n * v, "errors": []}
            i = index - store.shard_range(shard)[0]
            buf["tokens"][i, view] = batch["tokens"][row]
            if buf["scale"] is not None:
                buf["scale"][i, view] = batch["scale"][row]
            if batch["error"][row]:
                buf["errors"].append(str(batch["error"][row]))
            buf["left"] -= 1
            if buf["left"] == 0:
                self._finish(shard, self.open.pop(shard))
        return len(batch["shard"])

    def _finish(self, shard: int, buf: dict) -> None:
        if buf["errors"]:
            self.report.shards_failed += 1
            self.report.failures[shard] = f"{buf['errors'][0]} ({len(buf['errors'])} views failed)"
            return
        self.futures.append((shard, self.pool.submit(self.store.write_shard, shard, buf["tokens"], buf["scale"])))
        while len([f for _, f in self.futures if not f.done()]) > 2:  # bound the memory held
            time.sleep(0.01)

    def close(self) -> None:
        for shard, fut in self.futures:
            try:
                marker = fut.result()
                self.report.shards_written += 1
                self.report.bytes_written += marker["bytes"]
            except Exception as e:  # noqa: BLE001 - a full disk etc.: shard stays unmarked
                self.report.shards_failed += 1
                self.report.failures[shard] = f"write failed: {type(e).__name__}: {e}"


def pending_shards(store: Store, max_shards: int | None = None) -> list[int]:
    todo = [s for s in range(store.num_shards) if not store.is_complete(s)]
    return todo[:max_shards] if max_shards is not None else todo


def precompute(store: Store, spec: TeacherSpec, render, *, executor: str = "ray", batch_size: int = 8,
               num_workers: int | None = None, render_workers: int = 1, max_shards: int | None = None,
               progress: bool = True) -> Report:
    """Compute and store every planned view of the shards not yet complete."""
    report = Report(shards_total=store.num_shards,
                    shards_skipped=store.num_shards - len(pending_shards(store)))
    todo = pending_shards(store, max_shards)
    rows = [(s, i) for s in todo for i in range(*store.shard_range(s))]
    total = len(rows) * store.num_views
    bar = tqdm(total=total, unit="view", desc="teacher cache", disable=not progress)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=2) as pool:
        buffers = _ShardBuffers(store, report, pool)
        batches = (_ray_batches if executor == "ray" else _local_batches)(
            store, spec, render, rows, batch_size, num_workers, render_workers)
        for batch in batches:
            n = buffers.add(batch)
            report.views += n
            bar.update(n)
        buffers.close()
    report.seconds = time.perf_counter() - t0
    bar.close()
    return report


def _local_batches(store, spec, render, rows, batch_size, num_workers, render_workers):
    renderer = RenderViews(render, store.num_views, store.plan.input_size)
    worker = TeacherWorker(spec, store.dtype, store.manifest["teacher"]["weights_sha256"])
    pending = {"shard": [], "index": [], "view": [], "image": [], "error": []}
    for r, (shard, index) in enumerate(rows):
        views = renderer({"shard": [shard], "index": [index]})
        for k in pending:
            pending[k].extend(list(views[k]))
        while len(pending["shard"]) >= batch_size or (r == len(rows) - 1 and pending["shard"]):
            take = {k: v[:batch_size] for k, v in pending.items()}
            pending = {k: v[batch_size:] for k, v in pending.items()}
            take = {k: np.stack(v) if k == "image" else np.asarray(v) for k, v in take.items()}
            yield worker(take)


def _ray_batches(store, spec, render, rows, batch_size, num_workers, render_workers):
    import ray

    if not ray.is_initialized():
        raise RuntimeError("executor='ray' needs ray.init() (the job does it; --address joins a cluster)")
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # shards complete in order: few open buffers
    ctx.enable_progress_bars = False  # the driver's tqdm counts views
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    workers = num_workers or max(gpus, 1)
    ds = ray.data.from_items([{"shard": s, "index": i} for s, i in rows])
    ds = ds.map_batches(RenderViews, fn_constructor_args=(render, store.num_views, store.plan.input_size),
                        batch_size=1, compute=ray.data.ActorPoolStrategy(size=render_workers), num_cpus=1)
    ds = ds.map_batches(TeacherWorker, fn_constructor_args=(spec, store.dtype,
                                                            store.manifest["teacher"]["weights_sha256"]),
                        batch_size=batch_size, compute=ray.data.ActorPoolStrategy(size=workers),
                        num_gpus=1 if gpus else 0, num_cpus=0 if gpus else 1)
    yield from ds.iter_batches(batch_size=None, batch_format="numpy")


def verify(store: Store, teacher=None, render=None, samples: int = 8, seed: int = 0) -> dict:
    """Check a store against its plan: manifest consistent, every (image, view) present exactly
    once, and ``samples`` random views re-computed online (mean per-token cosine)."""
    problems = []
    plan = store.plan
    if plan.hash() != store.manifest["view_plan"]["hash"] or plan.num_views != store.num_views:
        problems.append("manifest view plan does not hash to its recorded hash")
    if tuple(store.tokens.shape[:2]) != (store.num_images, store.num_views):
        problems.append(f"tokens array {store.tokens.shape} does not match the manifest")
    if len(set(store.keys)) != len(store.keys):
        problems.append("duplicate sample keys")
    incomplete = sorted(set(range(store.num_shards)) - store.completed_shards())
    if incomplete:
        problems.append(f"{len(incomplete)} shards incomplete (first: {incomplete[:5]})")
    for shard in sorted(store.completed_shards()):
        problems += [f"shard {shard}: {p}" for p in store.shard_index_problems(shard)]
    result = {"images": store.num_images, "views_per_image": store.num_views,
              "complete_shards": len(store.completed_shards()), "shards": store.num_shards,
              "problems": problems}
    if teacher is not None and render is not None and store.completed_shards():
        rng = np.random.default_rng(seed)
        done = [i for i in range(store.num_images) if store.is_complete(i // store.shard_size)]
        cos = []
        for _ in range(samples):
            i, v = int(rng.choice(done)), int(rng.integers(store.num_views))
            online = teacher(torch.from_numpy(render(i, v))[None].float().div(255.0))[0]
            cos.append(F.cosine_similarity(store.read(i, v), online, dim=0).mean().item())
        result["online_cosine_mean"] = float(np.mean(cos))
        result["online_cosine_min"] = float(np.min(cos))
    return result
