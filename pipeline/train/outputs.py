"""What a training run leaves on disk, laid out as Ultralytics / RF-DETR users expect.

``runs/<name>`` per run (``name2``, ``name3``, ... when it exists, as Ultralytics increments; the
folder is claimed with a lock that the run holds until its process ends, so two runs started
together never share one),
``results.csv`` (one row per epoch: time, epoch-mean losses with the detection loss and the
distillation term apart, lr, the COCO statistics) and
``results.png``, ``train_batch0.jpg`` (the first augmented batch with its boxes), and at the end
``PR_curve.png`` and ``confusion_matrix.png`` computed from the final COCO evaluation's own arrays
(``COCOeval.eval['precision']`` and the ground truth / detections it scored).
"""
from __future__ import annotations

import csv
import fcntl
import math
import os
import re
import socket
from pathlib import Path

import numpy as np
import torch

RESULTS = "results.csv"
VAL_COLUMNS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR100", "kd_loss")   # kd_loss: a label-free stage
LOCK = ".run.lock"   # flock()ed by the process writing into the run folder
_HELD: dict[Path, int] = {}   # run folders this process holds -> the descriptor of their locked LOCK file


def is_main_loss(name: str) -> bool:
    """The total and the final decoder layer's terms (not the aux / denoising / encoder copies)."""
    return name.startswith("loss") and not re.search(r"_(aux|dn|enc|pre)(_|$)", name)


# -- run directory ---------------------------------------------------------------------------
class RunDirError(ValueError):
    """The run folder cannot be used: another running process holds it, or it cannot be created."""


def claim(folder: str | Path, flag: str = "--out") -> bool:
    """Hold ``folder`` for the rest of this process (``flock`` of its ``.run.lock``, created with the
    folder); False when another process holds it. The kernel drops the lock when the process ends,
    however it ends, so a killed run's folder is free again for ``--resume``."""
    folder = Path(folder)
    key = folder.absolute()
    if key in _HELD:
        return True
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise RunDirError(f"{flag} {folder}: cannot create the run folder there ({e.strerror or e}). Fix: choose "
                          "a folder on a writable disk") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return False
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
    _HELD[key] = fd
    return True


def release(folder: str | Path) -> None:
    """Give up a folder :func:`claim` holds (the lock file stays: it marks nothing by itself)."""
    fd = _HELD.pop(Path(folder).absolute(), None)
    if fd is not None:
        os.close(fd)


def _holder(folder: Path) -> str:
    try:
        return (folder / LOCK).read_text().strip() or "another process"
    except OSError:
        return "another process"


def _free(folder: Path) -> bool:
    """Absent, or a folder holding nothing but a run lock."""
    return not folder.exists() or (folder.is_dir() and all(p.name == LOCK for p in folder.iterdir()))


def hold(folder: str | Path, flag: str = "--out") -> Path:
    """:func:`claim` ``folder`` or refuse, naming the process that writes into it."""
    folder = Path(folder)
    if not claim(folder, flag):
        raise RunDirError(f"{flag} {folder}: a run ({_holder(folder)}) is writing into it now. Fix: wait for it to "
                          "end, or choose another folder")
    return folder


def increment_run_dir(base: str | Path, exist_ok: bool = False, flag: str = "--out") -> Path:
    """Claim this run's folder: ``base`` if it is free (absent or an empty folder) or ``exist_ok``
    (refused while another run writes into it); else ``base2``, ``base3``, ... (an existing run is
    never written into). The folder is created and held (:func:`claim`), so of two runs started
    together with the same ``base`` each gets its own."""
    base = Path(base)
    if exist_ok:
        return hold(base, flag)
    stem = re.sub(r"\d+$", "", base.name) or base.name
    n = int(base.name[len(stem):] or 1)
    folder = base
    while True:
        if _free(folder) and claim(folder, flag):
            if _free(folder):   # still empty now that it is ours
                return folder
            release(folder)
        n += 1
        folder = base.parent / f"{stem}{n}"


def resolve_resume(resume: str | Path) -> tuple[Path, Path]:
    """(run dir, checkpoint) of ``--resume``: a run directory (its last.pth) or a checkpoint file."""
    path = Path(resume)
    if path.is_dir():
        ckpt = path / "last.pth"
        if not ckpt.is_file():
            raise FileNotFoundError(f"--resume {path}: the run directory has no last.pth (the trainer writes "
                                    "it at every epoch end); give a checkpoint file instead")
        return path, ckpt
    if not path.is_file():
        raise FileNotFoundError(f"--resume {path}: no such run directory or checkpoint")
    return path.parent, path


def run_dir(out: str | None, name: str, exist_ok: bool, resume: str | None) -> tuple[Path, str | None]:
    """(this run's directory, checkpoint to resume), claimed for this process (:func:`claim`). A
    resumed run continues in its own directory (or in ``--out``), refused while another process
    writes into it; a new one gets ``--out`` or ``runs/<name>``, incremented when taken."""
    if resume:
        folder, ckpt = resolve_resume(resume)
        return hold(Path(out) if out else folder, "--out" if out else "--resume"), str(ckpt)
    return increment_run_dir(out or Path("runs") / name, exist_ok, "--out" if out else "--name"), None


# -- results.csv / results.png -----------------------------------------------------------------
class Results:
    """``results.csv``: one row per epoch; the header is the first row's keys (a resumed run
    appends under it). ``results.png`` is redrawn from the file after every row."""

    def __init__(self, folder: str | Path):
        self.csv, self.png = Path(folder) / RESULTS, Path(folder) / "results.png"

    def add(self, row: dict) -> None:
        fields = None
        if self.csv.is_file() and self.csv.stat().st_size:
            with open(self.csv, newline="") as f:
                fields = next(csv.reader(f))
        with open(self.csv, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields or list(row), extrasaction="ignore", restval="")
            if fields is None:
                writer.writeheader()
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
        plot_results(self.csv, self.png)


def is_distill_loss(name: str) -> bool:
    """A distillation term: DSI (``loss_distill``, already weighted by GAM's lambda) or RT-CO-DETR's
    ``loss_kd_*``; every other loss term is the detection criterion's."""
    return name == "loss_distill" or name.startswith("loss_kd_")


def results_row(epoch: int, means: dict, lr: float, stats: dict, seconds: float) -> dict:
    """One results.csv row: the epoch means of the total and the final-layer terms, the detection
    loss (``train/loss_det``: the total without the distillation terms) with the distillation weight
    when there is distillation (so a rising GAM lambda is not read as a diverging loss), lr, the main
    val statistics and ``time`` (seconds of training so far)."""
    row = {"epoch": epoch, **{f"train/{k}": v for k, v in means.items() if is_main_loss(k)}}
    distill = [k for k in means if is_distill_loss(k)]
    if distill and "loss" in means:
        row["train/loss_det"] = means["loss"] - sum(means[k] for k in distill)
        if "loss_distill" in means and "distill_weight" in means:
            row["train/distill_weight"] = means["distill_weight"]
    row["lr"] = means.get("lr", lr)
    row.update({f"val/{k}": stats[k] for k in VAL_COLUMNS if k in stats})
    row["time"] = seconds
    return row


def read_results(path: str | Path) -> dict[str, list[float]]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    cols = {k: [float(r[k]) if r.get(k) not in (None, "") else math.nan for r in rows] for k in (rows[0] if rows else {})}
    return cols


def last_time(path: str | Path) -> float:
    """The ``time`` of results.csv's last row (0 without one): where a resumed run's clock continues."""
    if not Path(path).is_file():
        return 0.0
    times = [t for t in read_results(path).get("time", []) if not math.isnan(t)]
    return times[-1] if times else 0.0


#: results.png panel titles that say what a column holds
TITLES = {"train/loss_det": "train/loss_det (detection)", "train/loss_distill": "train/loss_distill (lambda x DSI)",
          "train/dsi": "train/DSI (unweighted)", "train/distill_weight": "GAM lambda"}


def panels(cols: dict[str, list[float]]) -> dict[str, list[float]]:
    """The results.png series of results.csv's columns: no ``time``; with distillation the detection
    loss instead of the total, and the unweighted DSI loss (``train/dsi`` = lambda x DSI / lambda)
    next to the weighted term."""
    cols = {k: v for k, v in cols.items() if k != "time" and not (k == "train/loss" and "train/loss_det" in cols)}
    if "train/loss_distill" in cols and "train/distill_weight" in cols:
        dsi = [d / w if w else math.nan for d, w in zip(cols["train/loss_distill"], cols["train/distill_weight"])]
        names = list(cols)
        at = names.index("train/loss_distill") + 1
        cols = {**{k: cols[k] for k in names[:at]}, "train/dsi": dsi, **{k: cols[k] for k in names[at:]}}
    return cols


def plot_results(path: str | Path, png: str | Path) -> Path:
    """One panel per results.csv column against the epoch (losses, lr, AP/AR), as Ultralytics draws it.
    With distillation, the detection loss and the distillation term get their own panels, plus the
    unweighted DSI loss and GAM's lambda, instead of their sum: lambda rises by design, so the total
    would rise with it while both losses fall. The ``time`` column is not drawn."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = panels(read_results(path))
    epoch = cols.pop("epoch")
    names = list(cols)
    ncol = min(5, max(1, len(names)))
    nrow = math.ceil(len(names) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.2 * ncol, 2.6 * nrow), squeeze=False)
    for ax, name in zip(axes.flat, names):
        ax.plot(epoch, cols[name], "o-", markersize=3)
        ax.set_title(TITLES.get(name, name), fontsize=9)
        ax.tick_params(labelsize=7)
    for ax in axes.flat[len(names):]:
        ax.axis("off")
    fig.supxlabel("epoch", fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=90)
    plt.close(fig)
    return Path(png)


# -- train_batch0.jpg --------------------------------------------------------------------------
def save_batch(images: torch.Tensor, targets: list[dict], path: str | Path, class_names=None, max_images: int = 16):
    """The augmented batch as the model sees it ([B,3,H,W] in [0,1], boxes normalised cxcywh), its
    ground-truth boxes drawn, tiled into one JPEG."""
    from torchvision.io import write_jpeg
    from torchvision.ops import box_convert
    from torchvision.utils import draw_bounding_boxes, make_grid

    tiles = []
    for image, t in zip(images[:max_images].detach().cpu(), targets[:max_images]):
        h, w = image.shape[-2:]
        boxes = box_convert(t["boxes"].detach().cpu().float(), "cxcywh", "xyxy") * torch.tensor([w, h, w, h])
        names = [class_names[int(c)] if class_names else str(int(c)) for c in t["labels"]]
        image = (image.clamp(0, 1) * 255).round().to(torch.uint8)
        tiles.append(draw_bounding_boxes(image, boxes, labels=names, width=1) if len(boxes) else image)
    grid = make_grid(tiles, nrow=math.ceil(math.sqrt(len(tiles))), padding=2, pad_value=114)
    write_jpeg(grid, str(path), quality=90)
    return Path(path)


# -- PR curve and confusion matrix from the COCO evaluation --------------------------------------
def pr_curve(cocoeval, class_names: list[str], png: str | Path) -> Path:
    """Precision against recall at IoU 0.5 (all areas, 100 detections) per class and their mean:
    ``cocoeval.eval['precision'][T=0.5, :, K, area=all, maxDets=100]`` (-1 = class absent)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    precision = np.asarray(cocoeval.eval["precision"])     # [T, R, K, A, M]
    recall = np.asarray(cocoeval.params.recThrs)
    t = int(np.argmin(np.abs(np.asarray(cocoeval.params.iouThrs) - 0.5)))
    p = precision[t, :, :, 0, -1]                           # [R, K]
    fig, ax = plt.subplots(figsize=(6.5, 5))
    valid = []
    for k in range(p.shape[1]):
        if (p[:, k] < 0).all():
            continue
        pk = np.clip(p[:, k], 0, None)
        valid.append(pk)
        name = class_names[k] if k < len(class_names) else str(k)
        ax.plot(recall, pk, linewidth=1, label=f"{name} {pk.mean():.3f}")
    if valid:
        mean = np.mean(valid, axis=0)
        ax.plot(recall, mean, color="black", linewidth=2.5, label=f"all classes {mean.mean():.3f} AP50")
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02), title="Precision-recall (IoU 0.5)")
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return Path(png)


def confusion_matrix(cocoeval, iou: float = 0.5, score_thr: float = 0.25) -> np.ndarray:
    """[K+1, K+1] counts (rows: predicted class, columns: true class; index K = background) from
    the ground truth and detections the COCO evaluation scored, matched class-agnostically (the
    highest-IoU pairs >= ``iou`` first), detections below ``score_thr`` dropped, crowd boxes
    ignored; as Ultralytics' ConfusionMatrix counts."""
    from torchvision.ops import box_iou

    gt_api, dt_api = cocoeval.cocoGt, cocoeval.cocoDt
    cats = sorted(int(c) for c in cocoeval.params.catIds)
    index = {c: i for i, c in enumerate(cats)}
    k = len(cats)
    m = np.zeros((k + 1, k + 1), dtype=np.int64)
    by_image: dict[int, tuple[list, list]] = {int(i): ([], []) for i in cocoeval.params.imgIds}
    for a in gt_api.dataset["annotations"]:
        if int(a["image_id"]) in by_image and not a.get("iscrowd", 0) and int(a["category_id"]) in index:
            by_image[int(a["image_id"])][0].append(a)
    for a in dt_api.dataset["annotations"]:
        if int(a["image_id"]) in by_image and a["score"] >= score_thr and int(a["category_id"]) in index:
            by_image[int(a["image_id"])][1].append(a)

    def xyxy(anns):
        b = torch.tensor([a["bbox"] for a in anns], dtype=torch.float64).reshape(-1, 4)
        return torch.cat([b[:, :2], b[:, :2] + b[:, 2:]], 1)

    for gts, dts in by_image.values():
        g = [index[int(a["category_id"])] for a in gts]
        d = [index[int(a["category_id"])] for a in dts]
        matched_g, matched_d = set(), set()
        if gts and dts:
            ious = box_iou(xyxy(dts), xyxy(gts)).numpy()
            pairs = np.argwhere(ious >= iou)
            for di, gi in sorted(pairs.tolist(), key=lambda p: -ious[p[0], p[1]]):
                if di not in matched_d and gi not in matched_g:
                    matched_d.add(di), matched_g.add(gi)
                    m[d[di], g[gi]] += 1
        for di in set(range(len(d))) - matched_d:
            m[d[di], k] += 1          # false positive: predicted, no object
        for gi in set(range(len(g))) - matched_g:
            m[k, g[gi]] += 1          # missed: object, no prediction
    return m


def plot_confusion(matrix: np.ndarray, class_names: list[str], png: str | Path) -> Path:
    """The confusion matrix normalised per true class (column), counts in the cells."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [*class_names[: matrix.shape[0] - 1], "background"]
    norm = matrix / np.maximum(matrix.sum(0, keepdims=True), 1)
    n = len(names)
    fig, ax = plt.subplots(figsize=(1.0 + 0.7 * n, 0.8 + 0.6 * n))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    for i in range(n):
        for j in range(n):
            if matrix[i, j]:
                ax.text(j, i, str(matrix[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xticks(range(n), names, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(n), names, fontsize=7)
    ax.set(xlabel="true", ylabel="predicted", title="Confusion matrix (IoU 0.5, score >= 0.25)")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return Path(png)


def final_plots(cocoeval, class_names: list[str], folder: str | Path) -> list[Path]:
    folder = Path(folder)
    return [pr_curve(cocoeval, class_names, folder / "PR_curve.png"),
            plot_confusion(confusion_matrix(cocoeval), class_names, folder / "confusion_matrix.png")]


def epochs_since_best(path: str | Path, metric: str = "val/AP", lower_is_better: bool = False) -> int:
    """Epochs since ``metric`` last improved in results.csv (0 when the last epoch is the best)."""
    if not Path(path).is_file():
        return 0
    values = read_results(path).get(metric, [])
    if not values:
        return 0
    pick = np.nanargmin if lower_is_better else np.nanargmax
    best = int(pick(values)) if not all(math.isnan(v) for v in values) else 0
    return len(values) - 1 - best


def shared_images(data) -> int:
    """How many training images are also validation images (same resolved file); 0 when the
    training set is streamed from shards."""
    train = getattr(data.train_items, "dataset", data.train_items)
    if train is None or not hasattr(train, "image_path"):
        return 0
    files = lambda d: {d.image_path(i).resolve() for i in range(len(d))}  # noqa: E731
    return len(files(train) & files(data.val_dataset))
