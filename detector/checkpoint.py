"""Load and save RT-DETRv4 weights: released official/DEIM `.pth` files and our own checkpoints.

Official layout (tools/reference/convert_weight.py, det_solver.state_dict): {"model": sd} or a
training checkpoint with {"ema": {"module": sd}, "model": sd, ...}; the EMA weights win, as in the
official export/inference tools. Quirks handled: `module.` prefixes, int64 `decoder.reg_scale`,
`up`/`reg_scale` duplicated under `decoder.decoder.`, the 640-only `decoder.anchors`/`valid_mask`
buffers (regenerated, never loaded) and the training-only DSI projector
`encoder.feature_projector.0.*` (handed to a DSI module or reported as dropped).
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Mapping, Optional

import torch

from .config import SIZES, DetectorConfig

log = logging.getLogger(__name__)

FORMAT = "rtdetrv4/1"
PROJECTOR_PREFIX = "encoder.feature_projector."
REGENERATED = ("decoder.anchors", "decoder.valid_mask")
CLASS_HEAD_PREFIXES = ("decoder.enc_score_head.", "decoder.dec_score_head.", "decoder.denoising_class_embed.")


@dataclass
class LoadReport:
    path: str
    source: str                      # "ema", "model" or "state_dict"
    size: Optional[str]              # detected from tensor shapes
    loaded: int = 0                  # number of tensors copied into the model
    reinitialised: List[str] = field(default_factory=list)
    dropped: List[str] = field(default_factory=list)      # training-only keys not loaded anywhere
    regenerated: List[str] = field(default_factory=list)  # size-specific buffers rebuilt by the model
    projector_loaded: bool = False

    def __str__(self) -> str:
        parts = [f"loaded {self.loaded} tensors from {self.path} ({self.source}, size {self.size})"]
        if self.reinitialised:
            parts.append(f"re-initialised {len(self.reinitialised)} class-head tensors")
        if self.projector_loaded:
            parts.append("DSI projector loaded")
        if self.dropped:
            parts.append(f"dropped training-only {self.dropped}")
        return "; ".join(parts)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(path: str | Path) -> List[Path]:
    """Delete ``.<name>.tmp-<pid>`` files of ``path`` (or of every file in the folder ``path``) left by a
    process that was killed while writing (its pid no longer alive); returns the removed paths."""
    path = Path(path)
    pattern = ".*.tmp-*" if path.is_dir() else f".{path.name}.tmp-*"
    folder = path if path.is_dir() else path.parent
    removed = []
    for tmp in folder.glob(pattern):
        pid = tmp.name.rsplit(".tmp-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


@contextlib.contextmanager
def atomic_write(path: str | Path):
    """Yield a binary file that replaces ``path`` only once fully written (temp file + rename), so an
    interrupted write never leaves a truncated file; the one such helper of the project. Temp files
    of ``path`` left by a killed writer are removed first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def copy_checkpoint(src: str | Path, dst: str | Path) -> Path:
    """Copy a checkpoint file through :func:`atomic_write`: a kill during the copy leaves ``dst`` as it
    was (absent or whole), never a truncated file under its final name."""
    with open(src, "rb") as f, atomic_write(dst) as out:
        shutil.copyfileobj(f, out, 1 << 22)
    return Path(dst)


def _tensors(obj, prefix: str = ""):
    """(key path, tensor) of every tensor nested in dicts / lists / tuples, in a fixed order."""
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, Mapping):
        for k in sorted(obj, key=str):
            if not (prefix == "" and k == "checksum"):
                yield from _tensors(obj[k], f"{prefix}/{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{prefix}/{i}")


def tensors_sha256(obj) -> str:
    """sha256 over the key path, dtype, shape and bytes of every tensor in a checkpoint object."""
    h = hashlib.sha256()
    for key, t in _tensors(obj):
        t = t.detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_verified(obj: dict, path: str | Path) -> Path:
    """torch.save `obj` atomically with a "checksum" entry (tensors_sha256) that read_checkpoint checks."""
    with atomic_write(path) as f:
        torch.save({**obj, "checksum": {"tensors_sha256": tensors_sha256(obj)}}, f)
    return Path(path)


def read_checkpoint(path: str | Path, what: str = "checkpoint"):
    """torch.load with clear refusals naming `path`: missing file, not a PyTorch file, damaged or truncated
    file (unreadable, or its tensors no longer match the stored checksum) and non-finite weights."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path}: no such file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # pickle / zip / EOF errors
        raise ValueError(f"{what} {path}: cannot be read: not a PyTorch checkpoint, or damaged / truncated "
                         f"({type(e).__name__}: {str(e)[:200]})") from e
    if isinstance(obj, Mapping) and isinstance(obj.get("checksum"), Mapping):
        want = obj["checksum"].get("tensors_sha256")
        if want is not None and tensors_sha256(obj) != want:
            raise ValueError(f"{what} {path}: damaged: its tensors do not match the checksum stored when it was "
                             "written (a partial copy or a disk error); use another checkpoint")
    weights = {k: obj[k] for k in ("model", "ema", "dsi") if k in obj} if isinstance(obj, Mapping) else {}
    bad = [k for k, t in _tensors(weights or obj) if t.is_floating_point() and not bool(torch.isfinite(t).all())
           and not k.endswith(REGENERATED)]   # the 640 anchor table holds inf for invalid anchors
    if bad:
        raise ValueError(f"{what} {path}: holds non-finite weights (NaN/Inf) in {len(bad)} tensor(s), e.g. "
                         f"{bad[0].lstrip('/')}; it cannot be used (a diverged run: resume from an earlier one)")
    return obj


def detect_size(state: Mapping[str, torch.Tensor]) -> Optional[str]:
    """Size from shapes: HGNetv2 stem width (B0 16, B2 24, B4/B5 32) and encoder width (X 384)."""
    stem = state.get("backbone.stem.stem1.conv.weight")
    proj = state.get("encoder.input_proj.0.conv.weight")
    if stem is None or proj is None:
        return None
    key = (stem.shape[0], proj.shape[0], proj.shape[1])
    for name, cfg in SIZES.items():
        stem_w = {"B0": 16, "B2": 24, "B4": 32, "B5": 32}[cfg.backbone]
        if key == (stem_w, cfg.hidden_dim, cfg.backbone_channels[0]):
            return name
    return None


def extract_state(obj, path: str):
    if isinstance(obj, Mapping):
        ema = obj.get("ema")
        if isinstance(ema, Mapping) and isinstance(ema.get("module"), Mapping):
            return dict(ema["module"]), "ema"
        if isinstance(obj.get("model"), Mapping):
            return dict(obj["model"]), "model"
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()) and any(
                k.removeprefix("module.").startswith(("backbone.", "encoder.", "decoder.")) for k in obj):
            return dict(obj), "state_dict"
    keys = sorted(obj)[:8] if isinstance(obj, Mapping) else type(obj).__name__
    raise ValueError(f"{path}: not an RT-DETRv4 checkpoint (top-level {keys}); expected an official/DEIM .pth "
                     "with 'model' or 'ema'.'module', a file written by detector.save_checkpoint, or a raw "
                     "state dict with backbone./encoder./decoder. keys")


def _strip_module(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    return {k.removeprefix("module."): v for k, v in state.items()}


def _summarise(keys: List[str], n: int = 10) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f", ... ({len(keys)} in all)" if len(keys) > n else "")


def load_checkpoint(model: torch.nn.Module, path: str | Path, dsi: Optional[torch.nn.Module] = None) -> LoadReport:
    """Load weights into `model` (an RTDETRv4 built by build_detector, not deployed) strictly by the
    official key names. A different class count re-initialises only the class heads (fine-tuning);
    anything else that does not fit raises ValueError naming the keys, or both sizes."""
    path = str(path)
    if getattr(model, "deployed", False):
        raise RuntimeError("load_checkpoint needs the training form of the model; call deploy() after loading")
    obj = read_checkpoint(path)
    state, source = extract_state(obj, path)
    state = _strip_module(state)

    own = model.state_dict()
    ckpt_size, model_size = detect_size(state), detect_size(own)
    if ckpt_size != model_size:
        raise ValueError(f"{path} holds an RT-DETRv4-{(ckpt_size or 'unknown').upper()} checkpoint but the model is "
                         f"RT-DETRv4-{(model_size or 'unknown').upper()}; build it with "
                         f"build_detector({ckpt_size!r}) instead")
    report = LoadReport(path=path, source=source, size=ckpt_size)

    projector = {k: v for k, v in state.items() if k.startswith(PROJECTOR_PREFIX)}
    if projector:
        if dsi is not None:
            dsi.load_official_projector(projector)
            report.projector_loaded = True
        else:
            report.dropped = sorted(projector)
    report.regenerated = [k for k in REGENERATED if k in state]
    dn_embed = "decoder.denoising_class_embed.weight"
    if dn_embed in state and dn_embed not in own:  # model built with num_denoising=0
        report.dropped.append(dn_embed)
        state.pop(dn_embed)
    state = {k: v for k, v in state.items() if not k.startswith(PROJECTOR_PREFIX) and k not in REGENERATED}
    expected = {k for k in own if k not in REGENERATED}

    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(f"{path} does not match RT-DETRv4-{model_size.upper()}: missing keys [{_summarise(missing)}]; "
                         f"unexpected keys [{_summarise(unexpected)}]")

    mismatched = [k for k in expected if state[k].shape != own[k].shape]
    heads = [k for k in mismatched if k.startswith(CLASS_HEAD_PREFIXES)]
    other = [k for k in mismatched if k not in heads]
    if other:
        raise ValueError(f"{path}: shape mismatch for [{_summarise(other)}], e.g. {other[0]} "
                         f"{tuple(state[other[0]].shape)} in the file vs {tuple(own[other[0]].shape)} in the model")
    if heads:
        ckpt_classes = state["decoder.enc_score_head.weight"].shape[0]
        log.warning("%s: checkpoint has %d classes, model has %d: re-initialising the class heads "
                    "(enc_score_head, dec_score_head.*, denoising_class_embed); all other weights are loaded",
                    path, ckpt_classes, model.cfg.num_classes)
        report.reinitialised = sorted(heads)
        for k in heads:
            state[k] = own[k]
    # load_state_dict copies values into the existing tensors, so an int64 reg_scale stays int64
    model.load_state_dict(state, strict=False)
    report.loaded = len(state) - len(heads)
    log.info("%s", report)
    return report


def save_checkpoint(model: torch.nn.Module, path: str | Path, dsi: Optional[torch.nn.Module] = None,
                    **extra) -> Path:
    """Write {"model": official-layout state dict, "config": DetectorConfig fields, "format"}.

    The "model" entry uses the official key names (incl. the int64 reg_scale and the duplicated
    up/reg_scale), so official tools read it as well; with `dsi`, its projector is stored under
    encoder.feature_projector.0.* as in official training checkpoints. `extra` entries (e.g. ema,
    optimizer, epoch) are stored alongside.
    """
    if getattr(model, "deployed", False):
        raise RuntimeError("save the training form of the model; a deployed model has fused, renamed weights")
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if dsi is not None:
        state.update(dsi.official_projector_state_dict())
    cfg: DetectorConfig = model.cfg
    ckpt = {"format": FORMAT, "config": {k: v for k, v in asdict(cfg).items() if k != "pretrained_backbone"},
            "model": state, **extra}
    return save_verified(ckpt, path)


def detector_from_checkpoint(path: str | Path, dsi: Optional[torch.nn.Module] = None, **overrides):
    """Build the RT-DETRv4 a checkpoint holds and load it (e.g. an RT-CO-DETR teacher).

    Files from save_checkpoint carry their DetectorConfig; for any other layout the size comes from
    the tensor shapes, the class count from `decoder.enc_score_head` and the decoder depth from
    `decoder.decoder.layers.*`. `overrides` are DetectorConfig fields applied on top.
    """
    from .model import RTDETRv4, build_detector

    path = str(path)
    obj = read_checkpoint(path)
    if isinstance(obj, Mapping) and obj.get("format") == FORMAT and isinstance(obj.get("config"), Mapping):
        fields_ = {k: tuple(v) if isinstance(v, list) else v for k, v in obj["config"].items()}
        model = RTDETRv4(DetectorConfig(**{**fields_, **overrides}))
    else:
        state = _strip_module(extract_state(obj, path)[0])
        size = detect_size(state)
        if size is None:
            raise ValueError(f"{path}: cannot tell the RT-DETRv4 size from its weights (no HGNetv2 stem / encoder "
                             "input_proj of a known size)")
        layers = {int(k.split(".")[3]) for k in state if k.startswith("decoder.decoder.layers.")}
        inferred = {"num_classes": int(state["decoder.enc_score_head.weight"].shape[0])}
        if layers:
            inferred["num_decoder_layers"] = max(layers) + 1
        model = build_detector(size, **{**inferred, **overrides})
    load_checkpoint(model, path, dsi=dsi)
    return model
