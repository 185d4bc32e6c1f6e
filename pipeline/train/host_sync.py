"""Counting the host syncs of a training step (a measurement tool for benchmarks and tests).

On a GPU, ``torch.cuda.set_sync_debug_mode("warn")`` makes CUDA report every synchronising call
(``.item()``, ``.cpu()``, ``nonzero``, boolean masks, ...); each warning is one sync. On the CPU
nothing synchronises, so the same calls are counted where they would synchronise on a GPU: a
dispatch mode follows which tensors descend from the "device" side (the model's parameters and
buffers, the step's images and targets) and counts the ops whose result the host has to wait for
(``_local_scalar_dense`` = item/bool/float/tolist of one element, ``nonzero``, boolean-mask
indexing, ``masked_select``, ``unique``, ``repeat_interleave`` by a tensor, ``equal``), plus the
Python-level transfers ``.cpu()`` / ``.numpy()`` / ``.tolist()`` of such tensors and the blocking
``.to(device)`` of host tensors (a copy from pageable memory, which CUDA's mode reports too). Host-side
bookkeeping on tensors built from numpy (the Hungarian indices) is not a sync and is not counted.
"""
from __future__ import annotations

import traceback
import warnings
import weakref
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_flatten

aten = torch.ops.aten
_SYNC_OPS = {aten._local_scalar_dense.default, aten.nonzero.default, aten.equal.default, aten.is_nonzero.default,
             aten.masked_select.default, aten._unique2.default, aten.unique_dim.default,
             aten.unique_consecutive.default, aten.repeat_interleave.Tensor}
_INDEX_OPS = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}
_TRANSFERS = ("cpu", "numpy", "tolist")


class SyncCount:
    """Result of ``count_host_syncs``: ``total`` and ``where`` (a Counter "file:line op" -> count)."""

    def __init__(self):
        self.where: Counter = Counter()

    @property
    def total(self) -> int:
        return sum(self.where.values())

    def add(self, op: str) -> None:
        self.where[f"{_caller()} {op}"] += 1

    def __repr__(self) -> str:
        return f"SyncCount(total={self.total}, where={dict(self.where.most_common())})"


def _caller() -> str:
    """The innermost frame of project code (not torch, not this file) that made the call."""
    here = Path(__file__).resolve()
    for frame in reversed(traceback.extract_stack()[:-2]):
        f = Path(frame.filename)
        if f.resolve() != here and "torch" not in f.parts and "site-packages" not in f.parts:
            return f"{f.name}:{frame.lineno}"
    return "?"


class _Taint(TorchDispatchMode):
    def __init__(self, seeds, count: SyncCount):
        super().__init__()
        self.count = count
        self.live: dict[int, weakref.ref] = {}
        for t in seeds:
            self.mark(t)

    def mark(self, t) -> None:
        if isinstance(t, torch.Tensor):
            self.live[id(t)] = weakref.ref(t)

    def tainted(self, t) -> bool:
        r = self.live.get(id(t))
        return r is not None and r() is t

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        flat, _ = tree_flatten((args, kwargs))
        hot = any(isinstance(a, torch.Tensor) and self.tainted(a) for a in flat)
        out = func(*args, **kwargs)
        # a factory told to place its result (device=...) stands for a device allocation
        hot = hot or kwargs.get("device") is not None
        if hot:
            if func in _SYNC_OPS or (func in _INDEX_OPS and any(
                    isinstance(a, torch.Tensor) and a.dtype in (torch.bool, torch.uint8) for a in args[1])):
                self.count.add(func.__name__.split(".")[0])
            for o in tree_flatten(out)[0]:
                self.mark(o)
        return out


@contextmanager
def count_host_syncs(*seeds):
    """``with count_host_syncs(model, images, targets) as n: step()`` -> ``n.total`` syncs.

    Seeds (modules, tensors, lists/dicts of tensors) say what lives on the device in a CPU run;
    with CUDA tensors the CUDA sync debug mode counts instead and the seeds are not needed.
    """
    count = SyncCount()
    tensors = []
    for s in seeds:
        if isinstance(s, torch.nn.Module):
            tensors += list(s.parameters()) + list(s.buffers())
        else:
            tensors += [t for t in tree_flatten(s)[0] if isinstance(t, torch.Tensor)]
    if any(t.is_cuda for t in tensors) or (not tensors and torch.cuda.is_available()):
        with _cuda_sync_warnings(count):
            yield count
        return
    mode = _Taint(tensors, count)
    originals = {name: getattr(torch.Tensor, name) for name in _TRANSFERS}

    def patched(name):
        def method(self, *a, **k):
            if not mode.tainted(self):
                return originals[name](self, *a, **k)
            count.add(name)
            out = originals[name](self, *a, **k)
            if out is self:  # .cpu() of a CPU tensor: the copy a GPU run makes is host memory, untainted
                with _disable_current_modes():
                    out = self.view_as(self)
            return out
        return method

    original_to = torch.Tensor.to

    def to(self, *a, **k):
        out = original_to(self, *a, **k)
        if not mode.tainted(self) and _names_device(a, k):
            if not k.get("non_blocking", False):   # a blocking host-to-device copy (pageable memory)
                count.add("to")
            if out is self:   # .to(device) of a CPU tensor in a CPU run: the GPU run's copy is device-side
                with _disable_current_modes():
                    out = self.view_as(self)
            mode.mark(out)
        return out

    for name in _TRANSFERS:
        setattr(torch.Tensor, name, patched(name))
    torch.Tensor.to = to
    try:
        with mode:
            yield count
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)
        torch.Tensor.to = original_to


def _names_device(args, kwargs) -> bool:
    """Whether a ``Tensor.to`` call places its result on a device (not a dtype-only cast)."""
    first = args[0] if args else None
    return "device" in kwargs or isinstance(first, (torch.device, str, torch.Tensor))


@contextmanager
def _cuda_sync_warnings(count: SyncCount):
    torch.cuda.synchronize()
    old = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield count
        finally:
            torch.cuda.set_sync_debug_mode(old)
    for w in caught:
        if "synchroniz" in str(w.message):
            count.where[f"{Path(w.filename).name}:{w.lineno} cuda-sync"] += 1
