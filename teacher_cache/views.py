"""The view plan shared by the precompute job and the trainer (pure arithmetic, FKD-style replay).

For every image the cache holds view 0 = the plain (resize-only) view, view 1 = its flip, then K
views per augmented phase of the official stop-epoch policy (phases 2 = mosaic and 3 = zoom-out /
IoU crop; phases 1 and 4 apply no policy op and are served by views 0/1). Phase view j is the
record the trainer would draw at a "virtual epoch" of that phase, i.e.
``sample_record(seed, virtual_epoch, index)``, so replaying it is exact. At epoch e the trainer
replays one cached view of e's phase: ``view_for(e, index)`` cycles through the K views across
the epochs of the phase from a per-image offset, so consecutive epochs see different views.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

PLAN_VERSION = 1
PLAIN, PLAIN_FLIP = 0, 1
AUGMENTED_PHASES = (2, 3)
_MASK = (1 << 64) - 1
_SEED_STRIDE = 1_000_003  # extra rounds of draws when K exceeds the length of a phase


def _mix(*values: int) -> int:
    """splitmix64 over the values: a stable, platform-independent hash of integers."""
    x = 0x9E3779B97F4A7C15
    for v in values:
        x = (x ^ (v & _MASK)) * 0xBF58476D1CE4E5B9 & _MASK
        x = (x ^ (x >> 31)) * 0x94D049BB133111EB & _MASK
        x ^= x >> 29
    return x


def check_policy_epochs(epochs) -> tuple[int, int, int]:
    """``epochs`` as the ints ``(e0, e1, e2)`` of the official stop-epoch policy, or a ValueError."""
    e0, e1, e2 = (int(e) for e in epochs)
    if not 0 <= e0 <= e1 <= e2:
        raise ValueError(f"policy epochs must satisfy 0 <= e0 <= e1 <= e2, got {tuple(epochs)}")
    return e0, e1, e2


def policy_phase(epochs, epoch: int) -> int:
    """The phase (1..4) of ``epoch`` under the stop-epoch policy ``epochs = (e0, e1, e2)``; the one
    copy of this arithmetic, used by the view plan and by ``pipeline.data.policy.AugPolicy``."""
    e0, e1, e2 = epochs
    return 1 if epoch < e0 else 2 if epoch < e1 else 3 if epoch < e2 else 4


def phase_epochs(epochs, phase: int) -> range:
    """The epochs of ``phase`` (phase 4 is open-ended: ``range(e2, e2 + 1)`` stands for it)."""
    e0, e1, e2 = epochs
    return {1: range(0, e0), 2: range(e0, e1), 3: range(e1, e2), 4: range(e2, e2 + 1)}[phase]


@dataclass(frozen=True)
class ViewPlan:
    seed: int = 0
    k: int = 4  # cached views per augmented phase
    epochs: tuple[int, int, int] = (4, 29, 50)  # stop-epoch policy [e0, e1, e2]
    input_size: tuple[int, int] = (640, 640)  # (h, w) of the rendered view fed to the teacher

    def __post_init__(self):
        object.__setattr__(self, "epochs", check_policy_epochs(self.epochs))
        if self.k < 0:
            raise ValueError(f"views per phase must be >= 0, got {self.k}")
        object.__setattr__(self, "input_size", tuple(int(s) for s in self.input_size))

    # --- phases -----------------------------------------------------------------------------
    def phase(self, epoch: int) -> int:
        return policy_phase(self.epochs, epoch)

    def phase_epochs(self, phase: int) -> range:
        return phase_epochs(self.epochs, phase)

    def cached_phases(self) -> tuple[int, ...]:
        """Augmented phases that have epochs (an empty phase gets no views)."""
        return tuple(p for p in AUGMENTED_PHASES if len(self.phase_epochs(p)) and self.k)

    @property
    def num_views(self) -> int:
        return 2 + self.k * len(self.cached_phases())

    def _phase_base(self, phase: int) -> int:
        return 2 + self.k * self.cached_phases().index(phase)

    # --- trainer side -----------------------------------------------------------------------
    def plain_view(self, flip: bool) -> int:
        return PLAIN_FLIP if flip else PLAIN

    def view_for(self, epoch: int, index: int) -> int:
        """The cached view the trainer replays for image ``index`` at ``epoch``."""
        phase = self.phase(epoch)
        if phase not in self.cached_phases():
            return PLAIN_FLIP if _mix(self.seed, epoch, index, 1) & 1 else PLAIN
        start = self.phase_epochs(phase).start
        j = (epoch - start + _mix(self.seed, index, phase)) % self.k
        return self._phase_base(phase) + j

    def record_args(self, view_id: int) -> dict:
        """How to rebuild the view's augmentation record with the data pipeline:
        ``{"kind": "plain", "flip": b}`` -> ``plain_record(index, flip, size)``;
        ``{"kind": "sample", "seed", "epoch", "phase"}`` -> ``sample_record(seed, epoch, index, ...)``."""
        if not 0 <= view_id < self.num_views:
            raise IndexError(f"view {view_id} outside the plan's {self.num_views} views")
        if view_id < 2:
            return {"kind": "plain", "flip": view_id == PLAIN_FLIP}
        phase = self.cached_phases()[(view_id - 2) // self.k]
        j = (view_id - 2) % self.k
        epochs = self.phase_epochs(phase)
        n = len(epochs)
        if self.k <= n:  # spread the K virtual epochs over the phase
            epoch, round_ = epochs.start + j * n // self.k, 0
        else:  # more views than epochs: further rounds of draws with a derived seed
            epoch, round_ = epochs.start + j % n, j // n
        return {"kind": "sample", "seed": self.seed + round_ * _SEED_STRIDE, "epoch": epoch,
                "phase": phase}

    # --- identity ---------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"version": PLAN_VERSION, **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict) -> "ViewPlan":
        if d.get("version") != PLAN_VERSION:
            raise ValueError(f"view plan version {d.get('version')} is not {PLAN_VERSION}: "
                             "re-run the cache job with this code")
        return cls(seed=d["seed"], k=d["k"], epochs=tuple(d["epochs"]),
                   input_size=tuple(d["input_size"]))

    def hash(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]
