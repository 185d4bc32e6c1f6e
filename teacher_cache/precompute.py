"""Run a teacher over every planned view and fill a store, one whole shard at a time.

Ray Data streams the work: rows are images of the shards still
to do; CPU tasks decode each image once and render all its planned views (``render(index, view)``
-> uint8 [3, H, W], supplied by the job, which owns the data pipeline); an actor pool of teacher
workers (one GPU each when present) runs the teacher and quantises; the driver gathers rows in
order into shard buffers and hands each complete shard to ``Store.write_shard`` (one writer per
shard, whole shards, marker last). Shards with a valid marker are skipped, so a re-run only fills
the holes. ``executor="local"`` runs the same steps in-process, without Ray.
"""
from __future__ import annotations

import logging
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from .quantize import encode
from .store import Store, ViewError
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
    nodes: dict = field(default_factory=dict)  # shard -> {"render": [node, ...], "teacher": [node, ...]}
    rebuilt: dict = field(default_factory=dict)  # written shard/block that failed its re-check -> why
    unit: str = "shards"                           # what is written whole: shards (budget), blocks (exact)

    def views_per_node(self) -> dict:
        """node -> {"render": views rendered there, "teacher": views the teacher ran there}."""
        out: dict = {}
        for per_stage in self.nodes.values():
            for stage, counts in per_stage.items():
                for node, n in counts.items():
                    out.setdefault(node, {"render": 0, "teacher": 0})[stage] += n
        return out

    @property
    def views_per_s(self) -> float:
        return self.views / self.seconds if self.seconds else 0.0

    @property
    def bytes_per_view(self) -> float:
        return self.bytes_written / self.views if self.views else 0.0

    def summary(self) -> str:
        lines = [f"{self.unit}: {self.shards_written} written, {self.shards_skipped} skipped (already "
                 f"complete), {self.shards_failed} failed, of {self.shards_total}",
                 f"views: {self.views} in {self.seconds:.1f} s = {self.views_per_s:.2f} views/s; "
                 f"{self.bytes_per_view:,.0f} bytes per view on disk"]
        lines += [f"node {node}: rendered {n['render']} views, ran the teacher on {n['teacher']}"
                  for node, n in sorted(self.views_per_node().items())]
        lines += [f"rebuilt {s}: it failed its re-check ({e})" for s, e in sorted(self.rebuilt.items())]
        lines += [f"FAILED {s}: {e}" for s, e in sorted(self.failures.items())]
        if self.failures:
            lines.append(f"failed {self.unit} have no completion marker; fix the cause and re-run the same "
                         f"command: completed {self.unit} are kept and only the missing ones are computed")
        return "\n".join(lines)


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _node() -> str:
    """Where this stage runs: the Ray node's IP and id inside a cluster, else the host name."""
    try:
        import ray
        if ray.is_initialized():
            return f"{ray.util.get_node_ip_address()}/{ray.get_runtime_context().get_node_id()[:8]}"
    except ImportError:
        pass
    return socket.gethostname()


class RenderViews:
    """CPU stage: image rows -> one row per planned view (decode once, all views)."""

    def __init__(self, render, num_views: int, input_size: tuple[int, int]):
        self.render, self.num_views, self.shape = render, num_views, (3, *input_size)

    def __call__(self, batch: dict) -> dict:
        out = {"shard": [], "index": [], "view": [], "image": [], "error": [], "render_node": []}
        node = _node()
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
                out["render_node"].append(node)
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
        out = {k: batch[k] for k in ("shard", "index", "view", "error", "render_node")}
        out["teacher_node"] = np.asarray([_node()] * len(batch["shard"]))
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
                    "left": n * v, "errors": [], "render": {}, "teacher": {}}
            i = index - store.shard_range(shard)[0]
            buf["tokens"][i, view] = batch["tokens"][row]
            if buf["scale"] is not None:
                buf["scale"][i, view] = batch["scale"][row]
            if batch["error"][row]:
                buf["errors"].append(str(batch["error"][row]))
            for stage in ("render", "teacher"):
                node = str(batch[f"{stage}_node"][row])
                buf[stage][node] = buf[stage].get(node, 0) + 1
            buf["left"] -= 1
            if buf["left"] == 0:
                self._finish(shard, self.open.pop(shard))
        return len(batch["shard"])

    def _finish(self, shard: int, buf: dict) -> None:
        self.report.nodes[shard] = {"render": buf["render"], "teacher": buf["teacher"]}
        if buf["errors"]:
            self.report.shards_failed += 1
            self.report.failures[f"shard {shard}"] = f"{buf['errors'][0]} ({len(buf['errors'])} views failed)"
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
                self.report.failures[f"shard {shard}"] = f"write failed: {type(e).__name__}: {e}"


def pending_shards(store: Store, max_shards: int | None = None, recheck: bool = False) -> list[int]:
    """Shards still to write; with ``recheck`` also the written ones that fail a read-back (their
    indexes and every view's CRC-32C), which are then written again from scratch."""
    todo = [s for s in range(store.num_shards)
            if not store.is_complete(s) or (recheck and (store.shard_index_problems(s) or _damaged_views(store, s)))]
    return todo[:max_shards] if max_shards is not None else todo


def precompute(store: Store, spec: TeacherSpec, render, *, executor: str = "ray", batch_size: int = 8,
               num_workers: int | None = None, render_workers: int = 1, max_shards: int | None = None,
               progress: bool = True, recheck: bool = False) -> Report:
    """Compute and store every planned view of the shards not yet complete (with ``recheck``: and
    of the written shards that fail a read-back)."""
    everything = pending_shards(store, recheck=recheck)
    report = Report(shards_total=store.num_shards, shards_skipped=store.num_shards - len(everything))
    report.rebuilt = {f"shard {s}": "index or view checksum" for s in everything if store.is_complete(s)}
    todo = everything[:max_shards] if max_shards is not None else everything
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
    pending = {"shard": [], "index": [], "view": [], "image": [], "error": [], "render_node": []}
    for r, (shard, index) in enumerate(rows):
        views = renderer({"shard": [shard], "index": [index]})
        for k in pending:
            pending[k].extend(list(views[k]))
        while len(pending["shard"]) >= batch_size or (r == len(rows) - 1 and pending["shard"]):
            take = {k: v[:batch_size] for k, v in pending.items()}
            pending = {k: v[batch_size:] for k, v in pending.items()}
            take = {k: np.stack(v) if k == "image" else np.asarray(v) for k, v in take.items()}
            yield worker(take)


def _spread() -> dict:
    return {"scheduling_strategy": "SPREAD"}


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
                        batch_size=1, compute=ray.data.ActorPoolStrategy(size=render_workers), num_cpus=1,
                        ray_remote_args_fn=_spread)   # a pool over all nodes, not packed on the head
    ds = ds.map_batches(TeacherWorker, fn_constructor_args=(spec, store.dtype,
                                                            store.manifest["teacher"]["weights_sha256"]),
                        batch_size=batch_size, compute=ray.data.ActorPoolStrategy(size=workers),
                        num_gpus=1 if gpus else 0, num_cpus=0 if gpus else 1, ray_remote_args_fn=_spread)
    yield from ds.iter_batches(batch_size=None, batch_format="numpy")


def verify(store: Store, teacher=None, render=None, samples: int = 8, seed: int = 0) -> dict:
    """Check a store against its plan: manifest consistent, every (image, view) present exactly
    once, every view's bytes read back against its CRC-32C, and ``samples`` random views
    re-computed online (mean per-token cosine; a problem below 0.99)."""
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
        index_problems = store.shard_index_problems(shard)
        problems += [f"shard {shard}: {p}" for p in index_problems]
        if not index_problems:
            problems += [f"shard {shard}: {p}" for p in _damaged_views(store, shard)]
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
        if result["online_cosine_min"] < 0.99:
            problems.append(f"a re-computed view has mean cosine {result['online_cosine_min']:.4f} < 0.99 to "
                            "its stored grid (another teacher, or a render that differs from the store's)")
    return result


def _damaged_views(store: Store, shard: int, limit: int = 3) -> list[str]:
    """Read every view of a completed shard back; report (up to ``limit``) views failing their CRC."""
    start, stop = store.shard_range(shard)
    bad = []
    for i in range(start, stop):
        for v in range(store.num_views):
            try:
                store.read(i, v)
            except ViewError as e:
                bad.append(str(e))
    return bad[:limit] + ([f"... {len(bad) - limit} more damaged views"] if len(bad) > limit else [])


# --- exact mode: every step of a training plan --------------------------------------------------
class RenderSteps:
    """CPU stage of exact mode: (epoch, step) rows -> the step's global batch exactly as the
    trainer builds it (``render_step(epoch, step) -> (float images [G,3,S,S], sample indices)``)."""

    def __init__(self, render_step):
        self.render_step = render_step

    def __call__(self, batch: dict) -> dict:
        out = {"epoch": [], "step": [], "indices": [], "images": []}
        for epoch, step in zip(batch["epoch"], batch["step"]):
            images, indices = self.render_step(int(epoch), int(step))
            out["epoch"].append(int(epoch))
            out["step"].append(int(step))
            out["indices"].append(np.asarray(indices, np.int64))
            out["images"].append(np.asarray(images, np.float32))
        return {k: np.stack(v) for k, v in out.items()}


class TeacherSteps:
    """Teacher stage of exact mode: a step's images -> its quantised views (one forward per
    ``batch_size`` images of the step, all at the step's size)."""

    def __init__(self, spec: TeacherSpec, dtype: str, weights_sha256: str | None, batch_size: int):
        self.worker = TeacherWorker(spec, dtype, weights_sha256)
        self.batch_size = batch_size

    def __call__(self, batch: dict) -> dict:
        out = {"epoch": batch["epoch"], "step": batch["step"], "indices": batch["indices"], "tokens": [], "scale": [],
               "grid": []}
        for images in batch["images"]:
            out["grid"].append([images.shape[-2] // 32, images.shape[-1] // 32])
            x = torch.from_numpy(np.ascontiguousarray(images))
            tokens, scales = [], []
            for i in range(0, len(x), self.batch_size):
                grids = self.worker.teacher(x[i:i + self.batch_size].to(self.worker.device))
                t, s = encode(grids, self.worker.dtype)
                tokens.append(t.cpu())
                scales.append(s.cpu() if s is not None else None)
            out["tokens"].append(torch.cat(tokens).numpy())
            out["scale"].append(torch.cat(scales).numpy() if scales[0] is not None else np.zeros(0, np.float16))
        out["grid"] = np.asarray(out["grid"])
        out["tokens"], out["scale"] = np.stack(out["tokens"]), np.stack(out["scale"])
        return out


def pending_blocks(store, epochs=None, recheck: bool = False) -> tuple[list[tuple[int, int]], dict]:
    """The (epoch, block) units still to write, in plan order (so epochs complete one by one). With
    ``recheck`` every written block is read back first (indexes and every view's CRC-32C) and a
    damaged one is written again: returns ``(todo, {(epoch, block): its first problem})``."""
    todo, damaged = [], {}
    for e in (range(store.epochs) if epochs is None else epochs):
        done = store.completed_blocks(e)
        for b in range(store.blocks_per_epoch):
            if b in done and recheck:
                problems = store.verify_block(e, b)[0]
                if problems:
                    damaged[(e, b)] = problems[0]
            if b not in done or (e, b) in damaged:
                todo.append((e, b))
    return todo, damaged


def precompute_exact(store, spec: TeacherSpec, render_step, *, epochs=None, executor: str = "ray",
                     batch_size: int = 8, num_workers: int | None = None, render_workers: int = 1,
                     max_blocks: int | None = None, progress: bool = True, on_epoch=None,
                     recheck: bool = False) -> Report:
    """Fill an :class:`teacher_cache.exact.ExactStore` with every step of its plan, epoch by epoch;
    written blocks are skipped (with ``recheck``: unless they fail a read-back, then they are
    rebuilt), so a re-run fills the holes. A writer thread writes the finished blocks in order while
    the next steps are computed. ``on_epoch(e)`` is called when epoch ``e`` is complete (training may
    already be reading it)."""
    everything, damaged = pending_blocks(store, epochs, recheck)
    units = everything[:max_blocks] if max_blocks is not None else everything
    report = Report(shards_total=store.blocks_per_epoch * len(range(store.epochs) if epochs is None else epochs),
                    unit="blocks")
    report.shards_skipped = report.shards_total - len(everything)
    report.rebuilt = {store.block_name(*u): why for u, why in damaged.items()}
    steps = [(e, st) for e, b in units for st in store.block_steps(b)]
    bar = tqdm(total=len(steps) * store.global_batch, unit="view", desc="teacher cache (exact)", disable=not progress)
    left = {u: len(store.block_steps(u[1])) for u in units}
    views: dict[tuple[int, int], list] = {u: [] for u in units}
    gen = (_ray_steps if executor == "ray" else _local_steps)(store, spec, render_step, steps, batch_size,
                                                              num_workers, render_workers)
    writes: list = []   # (block, future), in plan order

    def finish(keep: int) -> None:
        while len(writes) > keep:   # at most ``keep`` blocks wait for the writer (bounds the memory held)
            (e, b), fut = writes.pop(0)
            try:
                report.bytes_written += fut.result()
                report.shards_written += 1
            except Exception as ex:  # noqa: BLE001 - a full disk etc.: the block stays unmarked
                report.shards_failed += 1
                report.failures[store.block_name(e, b)] = f"write failed: {type(ex).__name__}: {ex}"
            if on_epoch is not None and b == store.blocks_per_epoch - 1 and store.epoch_complete(e):
                on_epoch(e)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=1) as writer:
        for out in gen:
            for r in range(len(out["step"])):
                e, st = int(out["epoch"][r]), int(out["step"][r])
                unit = (e, st // store.steps_per_block)
                h, w = (int(v) for v in out["grid"][r])
                scale = out["scale"][r] if out["scale"][r].size else None
                views[unit] += [(st, slot, int(i), out["tokens"][r][slot], None if scale is None else scale[slot],
                                 (h, w)) for slot, i in enumerate(out["indices"][r])]
                report.views += len(out["indices"][r])
                bar.update(len(out["indices"][r]))
                left[unit] -= 1
                if left[unit] == 0:
                    writes.append((unit, writer.submit(store.write_block, *unit, views.pop(unit))))
                    finish(keep=2)
        finish(keep=0)
    report.seconds = time.perf_counter() - t0
    bar.close()
    return report


def _local_steps(store, spec, render_step, steps, batch_size, num_workers, render_workers):
    """In-process: the teacher here; with ``render_workers > 1`` the steps are rendered ahead, in
    order, by that many DataLoader worker processes, so decoding overlaps the teacher (on a GPU
    machine one process rendering is the bottleneck: measured in docs/gpu.md)."""
    render = _RenderOne(RenderSteps(render_step))
    teacher = TeacherSteps(spec, store.dtype, store.manifest["teacher"]["weights_sha256"], batch_size)
    rendered = (map(render, steps) if render_workers <= 1 else
                DataLoader(steps, batch_size=None, collate_fn=render, num_workers=render_workers, prefetch_factor=4))
    return (teacher(batch) for batch in rendered)   # the teacher is built now, before the clock starts


class _RenderOne:
    """(epoch, step) -> RenderSteps' batch of that one step (a picklable DataLoader collate_fn)."""

    def __init__(self, render: RenderSteps):
        self.render = render

    def __call__(self, epoch_step) -> dict:
        epoch, step = epoch_step
        return self.render({"epoch": [epoch], "step": [step]})


def _ray_steps(store, spec, render_step, steps, batch_size, num_workers, render_workers):
    import ray

    if not ray.is_initialized():
        raise RuntimeError("executor='ray' needs ray.init() (the job does it; --address joins a cluster)")
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # shard files complete in plan order
    ctx.enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    ds = ray.data.from_items([{"epoch": e, "step": s} for e, s in steps])
    ds = ds.map_batches(RenderSteps, fn_constructor_args=(render_step,), batch_size=1,
                        compute=ray.data.ActorPoolStrategy(size=render_workers), num_cpus=1)
    ds = ds.map_batches(TeacherSteps, fn_constructor_args=(spec, store.dtype, store.manifest["teacher"]["weights_sha256"],
                                                           batch_size),
                        batch_size=1, compute=ray.data.ActorPoolStrategy(size=num_workers or max(gpus, 1)),
                        num_gpus=1 if gpus else 0, num_cpus=0 if gpus else 1)
    yield from ds.iter_batches(batch_size=1, batch_format="numpy")


def verify_exact(store, teacher=None, render_step=None, samples: int = 4, seed: int = 0,
                 min_cosine: float = 0.99) -> dict:
    """Re-read every view of every block (indexes and checksums; a block not written is a problem),
    and re-compute ``samples`` random stored steps online: a problem names the block and view."""
    problems, read, written = [], 0, []
    for e in range(store.epochs):
        done = store.completed_blocks(e)
        for b in range(store.blocks_per_epoch):
            p, n = store.verify_block(e, b)
            problems += p
            read += n
            written += [(e, b)] if b in done else []
    total = store.epochs * store.blocks_per_epoch
    result = {"plan": store.plan_hash, "epochs": store.epochs, "blocks_written": len(written),
              "blocks_missing": total - len(written), "views_read": read, "problems": problems}
    if teacher is not None and render_step is not None and written:
        from .quantize import decode
        rng = np.random.default_rng(seed)
        cos = []
        for _ in range(samples):
            e, b = written[int(rng.integers(len(written)))]
            st = int(rng.choice(list(store.block_steps(b))))
            images, indices = render_step(e, st)
            online = teacher(torch.as_tensor(np.asarray(images, np.float32)))
            stored = store.read_many([(e, st, k, int(i)) for k, i in enumerate(indices)])
            for slot, got in enumerate(stored):
                if isinstance(got, ViewError):   # damaged (reported above), or another plan's sample
                    problems += [str(got)] if str(got) not in problems else []
                    continue
                tokens, scale, grid = got
                c = F.cosine_similarity(decode(tokens, scale, grid), online[slot], dim=0).mean().item()
                cos.append(c)
                if c < min_cosine:
                    problems.append(f"{store.block_name(e, b)} view (epoch {e}, step {st}, slot {slot}): "
                                    f"cosine {c:.4f} to the online teacher < {min_cosine}")
        if cos:
            result["online_cosine_mean"], result["online_cosine_min"] = float(np.mean(cos)), float(np.min(cos))
    return result
