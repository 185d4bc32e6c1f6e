"""Process-group set-up for ``torchrun`` (NCCL on GPU, gloo on CPU) and the few collectives the
trainer needs. A plain ``python -m jobs.train`` runs as a world of one with no process group."""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str | None = None) -> DistInfo:
    """Reads torchrun's RANK/WORLD_SIZE/LOCAL_RANK; picks cuda:LOCAL_RANK when CUDA is present."""
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    if use_cuda:
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return DistInfo(rank, world, local, dev)


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_true(flag: torch.Tensor) -> bool:
    """True when ``flag`` (a 0-d bool tensor) holds on every rank: one host sync, so every rank
    takes the same branch (a rank skipping backward alone would hang DDP)."""
    if dist.is_available() and dist.is_initialized():
        flag = flag.to(torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag)


def reduce_mean(values: dict[str, torch.Tensor]) -> dict[str, float]:
    """Mean over ranks of scalar tensors, returned as floats (for logging only)."""
    if not values:
        return {}
    keys = sorted(values)
    stacked = torch.stack([values[k].detach().float() for k in keys])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(stacked)
        stacked /= dist.get_world_size()
    return dict(zip(keys, stacked.tolist()))


def all_gather_floats(value: float) -> list[float]:
    """``value`` from every rank (a once-per-epoch consistency record, e.g. the GAM weight)."""
    return all_gather_objects(float(value))


def all_gather_objects(value) -> list:
    """Any picklable ``value`` from every rank, in rank order."""
    if not (dist.is_available() and dist.is_initialized()):
        return [value]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def weights_digest(module: torch.nn.Module) -> str:
    """sha256 of every parameter, in order: DDP keeps them identical on every rank, so the
    per-epoch record of it shows the ranks did not drift apart. Buffers are left out: BatchNorm
    statistics move locally in each forward and DDP re-broadcasts rank 0's before the next one."""
    h = hashlib.sha256()
    for name, t in module.named_parameters():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
