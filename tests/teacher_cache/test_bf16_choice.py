"""The CPU bf16 rule: bf16 only with native bf16 flags AND a faster measurement, else fp32 with a note."""
from __future__ import annotations

import time

import pytest

from teacher_cache import bf16


@pytest.fixture
def flags(monkeypatch):
    def set_flags(names, capability="avx2"):
        monkeypatch.setattr(bf16, "cpu_flags", lambda: frozenset(names))
        monkeypatch.setattr("torch.backends.cpu.get_cpu_capability", lambda: capability)
    return set_flags


def _calls():
    ran = []
    return ran, (lambda: ran.append("fp32")), (lambda: ran.append("bf16"))


def test_no_native_bf16_is_fp32_and_never_runs_the_emulation(flags):
    flags({"avx2", "avx512f"})
    ran, fp32, low = _calls()
    choice = bf16.cpu_bf16_choice(fp32, low, what="teacher")
    assert not choice.use and ran == []
    assert "no native bf16" in choice.note and choice.note.startswith("teacher: fp32")


@pytest.mark.parametrize("names, capability", [({"avx512_bf16"}, "avx512"), ({"amx_bf16"}, "avx512"),
                                               (set(), "avx512_bf16")])
def test_native_bf16_uses_the_measurement(flags, names, capability):
    flags(names, capability)
    slow = lambda: time.sleep(0.02)  # noqa: E731
    fast = lambda: None  # noqa: E731
    assert bf16.cpu_bf16_choice(slow, fast).use            # bf16 clearly faster
    slower = bf16.cpu_bf16_choice(fast, slow)              # bf16 clearly slower
    assert not slower.use and "not faster" in slower.note


def test_cpu_flags_parses_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx512f avx512_bf16\n\nprocessor\t: 1\n")
    bf16.cpu_flags.cache_clear()
    try:
        assert bf16.cpu_flags(str(info)) >= {"avx512f", "avx512_bf16"}
        assert bf16.cpu_flags(str(tmp_path / "missing")) == frozenset()
    finally:
        bf16.cpu_flags.cache_clear()


def test_teacher_auto_on_cpu_follows_the_rule(flags):
    import torch

    from teacher_cache.teachers import build_teacher, choose_precision

    flags({"avx2"})
    with pytest.warns(UserWarning, match="RANDOMLY INITIALISED"):
        teacher = build_teacher("dinov3_vits", depth=1)
    precision, fidelity = choose_precision(teacher, torch.rand(1, 3, 64, 64), "auto")
    assert (precision, fidelity) == ("fp32", None)
