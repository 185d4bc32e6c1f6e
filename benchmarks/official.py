"""The official RT-DETRv4 training code, imported from a local checkout and fed this project's data.

Shared by ``benchmarks/official_step.py`` (one step) and ``benchmarks/recipe_parity.py`` (a whole run).
The official modules run as released; this file only connects them to our data and our machine:

* :func:`import_official` puts a checkout (``--official-src``, never committed) on ``sys.path``;
* :func:`official_teacher` puts our random-init timm ViT behind its ``DINOv3TeacherModel`` (its
  hub checkout and weights are not needed);
* :func:`portable_distill` replaces the DSI zero it creates on a hard-coded ``cuda`` device for
  layers without features (aux / pre / enc / dn), so the criterion runs on a CPU (official bug 13);
* :func:`official_config` builds its YAML config of a size at our image size and class count;
  :func:`set_parts` hands it ready-made parts (loaders, evaluator, post-processor, teacher);
* :class:`PlanLoader` / :class:`ValLoader` hand it our training plan's collated batches and our
  validation set, in the shapes its ``DetSolver`` iterates;
* :class:`CategoryIds` turns its contiguous labels into our data set's category ids (what its
  ``remap_mscoco_category`` does for COCO's ids);
* :func:`one_rank_ddp` gives its model the parameter names of a one-rank DDP: its GAM counts the
  AIFI gradient by the name prefix ``module.encoder.encoder`` and sees 0 % in a single process
  without it (official bug 1; the released runs used DDP);
* :func:`ours_to_official_state` is our model's state under the official names (the DSI projector
  as ``encoder.feature_projector``), for starting both from the same weights.

The official tree imports ``calflops`` and ``accelerate`` (its profiler module): ``pip install
--no-deps calflops accelerate`` into the run's environment; they are no project dependencies.
"""
from __future__ import annotations

import contextlib
import copy
import io
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from teacher_cache.teachers import build_teacher


@dataclass
class Official:
    """The official entry points a benchmark uses."""
    root: Path
    YAMLConfig: type
    train_one_epoch: object
    DetSolver: type
    CocoEvaluator: type
    det_solver: object     # the module, whose ``train_one_epoch`` global ``DetSolver.fit`` calls


def import_official(src: str) -> Official:
    """The official ``engine`` package of an RT-DETRv4 checkout (a clear error when it cannot import)."""
    root = Path(src).resolve()
    if not (root / "engine" / "core" / "yaml_config.py").is_file():
        raise SystemExit(f"--official-src {src}: no engine/core/yaml_config.py there; pass the root of an "
                         "RT-DETRv4 checkout (github.com/RT-DETRs/RT-DETRv4)")
    sys.path.insert(0, str(root))
    try:
        import engine  # noqa: F401
        from engine.core import YAMLConfig
        from engine.data import CocoEvaluator
        from engine.solver import det_solver
        from engine.solver.det_engine import train_one_epoch
    except ModuleNotFoundError as e:
        raise SystemExit(f"the official code needs {e.name!r}: pip install --no-deps {e.name} (into this "
                         "run's environment only; it is no project dependency)") from e
    return Official(root, YAMLConfig, train_one_epoch, det_solver.DetSolver, CocoEvaluator, det_solver)


def official_config(off: Official, size: str, img_size: int, num_classes: int, teacher_dim: int = 768, **overrides):
    """``configs/rtv4/rtv4_hgnetv2_<size>_coco.yml`` with the backbone pretraining off, evaluation at
    ``img_size``, our class count with contiguous labels (no COCO id remapping), a DSI projector to
    ``teacher_dim`` and ``overrides`` (top-level keys)."""
    return off.YAMLConfig(str(off.root / "configs" / "rtv4" / f"rtv4_hgnetv2_{size}_coco.yml"),
                          HGNetv2={"pretrained": False}, eval_spatial_size=[img_size, img_size],
                          num_classes=num_classes, HybridEncoder={"distill_teacher_dim": teacher_dim},
                          remap_mscoco_category=False, **overrides)


def set_parts(cfg, **parts) -> None:
    """Give an official YAMLConfig ready-made parts (``train_dataloader=...``, ``evaluator=...``): its
    properties have no setters; its BaseConfig keeps each part in ``_<name>`` and builds it from the
    YAML only while that is None."""
    for name, part in parts.items():
        if not hasattr(cfg, f"_{name}"):
            raise AttributeError(f"the official config has no part {name!r}")
        setattr(cfg, f"_{name}", part)


class _HubStandIn(nn.Module):
    """What the official DINOv3TeacherModel calls as ``self.model``: our ViT giving its final-norm
    patch tokens as ``x_norm_patchtokens`` (DINOv3's hub interface)."""

    def __init__(self, vit: nn.Module):
        super().__init__()
        self.vit = vit

    def forward(self, x, is_training=True, masks=None):
        tokens = self.vit.forward_features(x)
        return {"x_norm_patchtokens": tokens[:, self.vit.num_prefix_tokens:]}


def official_teacher(vfm: str, device):
    """The official ``DINOv3TeacherModel`` (normalise, 2x2 average pool, patch tokens as a grid)
    around our ``build_teacher(vfm)`` ViT: the same random-init weights as our online teacher."""
    from engine.rtv4.dinov3_teacher import DINOv3TeacherModel
    from torchvision.transforms import v2 as transforms
    ours = build_teacher(vfm)
    t = DINOv3TeacherModel.__new__(DINOv3TeacherModel)
    nn.Module.__init__(t)
    t.patch_size, t.teacher_feature_dim = ours.patch, ours.embed_dim
    t.model = _HubStandIn(ours.model).eval().requires_grad_(False)
    t.normalize_transform = transforms.Normalize(mean=ours.mean.flatten().tolist(), std=ours.std.flatten().tolist())
    t.avgpool_2x2 = nn.AvgPool2d(kernel_size=2, stride=2)
    return t.to(device).eval()


def portable_distill(criterion) -> None:
    """The official DSI term of a layer without features (aux/pre/dn) returns a zero placed on
    device='cuda' (hard-coded), so it cannot run on the CPU; the same zero on the outputs' device."""
    official = criterion.loss_distillation

    def loss_distillation(outputs, *args, **kwargs):
        if outputs.get("student_distill_output") is None or outputs.get("teacher_encoder_output") is None:
            return {"loss_distill": torch.zeros((), device=outputs["pred_logits"].device, requires_grad=True)}
        return official(outputs, *args, **kwargs)

    criterion.loss_distillation = loss_distillation


def drop_distill(criterion) -> None:
    """No teacher: no DSI term (our ``--distill none``)."""
    criterion.losses = [x for x in criterion.losses if x != "distill"]


def one_rank_ddp(model: nn.Module) -> nn.Module:
    """``model`` under the names and type a one-rank DDP gives it (``module.`` prefix; the official
    ``de_parallel`` unwraps it), without a process group: the forward is the model's own, so nothing
    but the names changes (no gradient all-reduce happens with one rank anyway)."""
    wrapper = DDP.__new__(DDP)
    nn.Module.__init__(wrapper)
    wrapper.module = model
    wrapper.forward = model.forward
    return wrapper


def ours_to_official_state(detector: nn.Module, dsi: nn.Module | None = None) -> dict:
    """Our detector's state dict (official key names) plus the DSI projector under its official
    name ``encoder.feature_projector.0.*``."""
    state = dict(detector.state_dict())
    if dsi is not None:
        state.update(dsi.official_projector_state_dict())
    return state


class PlanLoader:
    """Our training plan's batches of an epoch, as the official ``DetSolver.fit`` iterates its train
    loader: ``len()``, ``set_epoch(e)``, ``(images, targets)`` with only tensors in the targets, and a
    ``collate_fn`` carrying the recipe values the solver reads (stop epoch, EMA restart decay, base size).
    ``on_epoch(e)`` is called by ``set_epoch`` (a benchmark records what the epoch starts with)."""

    def __init__(self, data, steps_per_epoch: int, stop_epoch: int, ema_restart_decay: float, base_size: int,
                 on_epoch=None):
        self.data, self.steps = data, steps_per_epoch
        self.collate_fn = SimpleNamespace(stop_epoch=stop_epoch, ema_restart_decay=ema_restart_decay,
                                          base_size=base_size)
        self.epoch, self.on_epoch = 0, on_epoch
        self.shuffle = True   # read by its solver (for a DistributedSampler); the plan orders the samples

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if self.on_epoch is not None:
            self.on_epoch(epoch)

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        for i, (images, targets, _) in enumerate(self.data.train_loader(self.epoch)):
            if i >= self.steps:
                break
            yield images, [{k: t[k] for k in ("labels", "boxes")} for t in targets]


class ValLoader:
    """Our validation view (the one our trainer evaluates on), at most ``max_images``, with the
    target tensors the official ``evaluate`` reads (``image_id``, ``orig_size``). ``on_eval()`` is
    called when an evaluation starts (after the epoch's training and GAM update)."""

    def __init__(self, data, batch_size: int, max_images: int | None = None, on_eval=None):
        self.data, self.batch_size, self.max_images, self.on_eval = data, batch_size, max_images, on_eval
        n = len(data.val_dataset) if max_images is None else min(max_images, len(data.val_dataset))
        self.batches = -(-n // batch_size)
        self.shuffle = False

    def __len__(self) -> int:
        return self.batches

    def __iter__(self):
        if self.on_eval is not None:
            self.on_eval()
        for i, (images, targets) in enumerate(self.data.val_loader()):
            if i >= self.batches:
                break
            yield images, [{"image_id": torch.as_tensor(t["image_id"]), "orig_size": torch.as_tensor(t["orig_size"])}
                           for t in targets]


class CategoryIds(nn.Module):
    """The official post-processor with its contiguous labels mapped to the data set's category ids."""

    def __init__(self, postprocessor: nn.Module, label_to_category_id):
        super().__init__()
        self.postprocessor = postprocessor
        self.register_buffer("ids", torch.as_tensor(list(label_to_category_id), dtype=torch.int64), persistent=False)

    def forward(self, outputs, orig_target_sizes):
        results = self.postprocessor(outputs, orig_target_sizes)
        return [{**r, "labels": self.ids.to(r["labels"].device)[r["labels"]]} for r in results]


def coco_ground_truth(gt: dict):
    """Our validation ground truth as the COCO object the official ``CocoEvaluator`` takes."""
    from faster_coco_eval import COCO
    coco = COCO()
    coco.dataset = copy.deepcopy(gt)
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco
