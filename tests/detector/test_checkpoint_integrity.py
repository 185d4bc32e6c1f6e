"""Checkpoints carry a sha256 of their tensors: damaged, truncated and non-finite files are refused at load
with their path named; a save killed half-way leaves no temp file once the next save (or run) starts."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from detector.checkpoint import read_checkpoint, remove_stale_temps, save_verified, tensors_sha256


def _obj():
    return {"model": {"w": torch.arange(4096, dtype=torch.float32), "n": torch.tensor(3)}, "epoch": 2}


def test_round_trip_keeps_everything_and_a_checksum(tmp_path):
    path = save_verified(_obj(), tmp_path / "a.pth")
    got = read_checkpoint(path)
    assert torch.equal(got["model"]["w"], _obj()["model"]["w"]) and got["epoch"] == 2
    assert got["checksum"]["tensors_sha256"] == tensors_sha256(_obj())


def test_bytes_overwritten_in_the_middle_are_refused(tmp_path):
    path = save_verified(_obj(), tmp_path / "a.pth")
    data = bytearray(path.read_bytes())
    at = data.find(torch.arange(4096, dtype=torch.float32).numpy().tobytes()[4000:4016])
    assert at > 0
    data[at:at + 16] = b"\xff" * 16   # inside the tensor bytes: the zip container still reads
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=f"{path}: damaged"):
        read_checkpoint(path)


def test_truncated_and_non_checkpoint_files_are_refused(tmp_path):
    path = save_verified(_obj(), tmp_path / "a.pth")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match=f"{path}: cannot be read.*truncated"):
        read_checkpoint(path)
    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint")
    with pytest.raises(ValueError, match=f"{text}: cannot be read"):
        read_checkpoint(text)


def test_non_finite_weights_are_refused(tmp_path):
    obj = _obj()
    obj["model"]["w"][7] = float("nan")
    path = save_verified(obj, tmp_path / "nan.pth")
    with pytest.raises(ValueError, match=f"{path}: holds non-finite weights.*model/w"):
        read_checkpoint(path)


def test_a_killed_save_leaves_no_temp_file_after_the_next_save(tmp_path):
    target = tmp_path / "last.pth"
    # a writer killed inside torch.save leaves its .last.pth.tmp-<pid>
    code = ("import os, torch, sys\nfrom detector.checkpoint import atomic_write\n"
            "with atomic_write(sys.argv[1]) as f:\n    f.write(b'partial')\n    f.flush()\n    os._exit(9)\n")
    subprocess.run([sys.executable, "-c", code, str(target)], cwd=Path(__file__).resolve().parents[2], check=False)
    assert [p.name for p in tmp_path.glob(".last.pth.tmp-*")] and not target.exists()
    save_verified(_obj(), target)
    assert not list(tmp_path.glob(".*.tmp-*")) and read_checkpoint(target)["epoch"] == 2
    # and a whole run directory is swept at start (remove_stale_temps on the folder)
    (tmp_path / ".best.pth.tmp-999999999").write_bytes(b"x")
    assert [p.name for p in remove_stale_temps(tmp_path)] == [".best.pth.tmp-999999999"]
