"""The one interface of the two teacher stores, and :func:`open_store`, which returns the kind a
store's manifest declares. Callers hold a :class:`TeacherStore` and never ask which kind it is.

- exact (:class:`teacher_cache.exact.ExactStore`): the teacher's output for every (epoch, step,
  slot) of a training plan, at the step's grid, MixUp included;
- budget (:class:`teacher_cache.store.Store`, ``--views K``): K replayed views per augmented phase,
  whose augmentation record replaces the plan's (``view_args``), grids resized to the step's size.
"""
from __future__ import annotations

from typing import Protocol

from .layout import Location, StoreError, read_json, require_bucket


class TeacherStore(Protocol):
    url: str
    manifest: dict

    @property
    def dim(self) -> int: ...          # teacher channels

    @property
    def precision(self) -> str: ...    # the teacher precision the store was computed in

    def check_teacher(self, fingerprint: dict) -> None: ...   # StoreMismatch naming the field

    def check_plan(self, plan) -> None: ...   # a pipeline.data.plan.TrainPlan; StoreMismatch naming the field

    def recorded_plan(self) -> dict | None: ...   # the plan flags it was built with (jobs.train adopts them)

    def coverage(self, epoch: int) -> str: ...

    def describe(self) -> str: ...     # one line for the run's log

    def join(self, strict: bool): ...  # worker side: items (epoch, step, slot, index) -> per item a target dict

    def view_args(self, epoch: int, index: int) -> dict | None: ...   # a replayed view's record args, or None


def missing_manifest(url: str) -> StoreError:
    """The one message for a location without a store."""
    return StoreError(f"no teacher-feature store at {url} (manifest.json missing): build one with "
                      "`python -m jobs.cache_teacher --out ...`, or pass --cache none for the online teacher")


def open_store(url: str) -> TeacherStore:
    """The store at ``url``, of the kind its manifest declares."""
    from . import exact, store

    loc = Location(url)
    require_bucket(loc.fs, loc.root, url)
    try:
        kind = read_json(loc.fs, loc.path("manifest.json")).get("format")
    except FileNotFoundError:
        raise missing_manifest(url) from None
    return exact.ExactStore.open(url) if kind == exact.FORMAT else store.Store.open(url)
