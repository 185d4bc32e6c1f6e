"""Every job answers --help without importing torch, Ray or onnxruntime, shows every default and
names only files that exist."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
JOBS = sorted(p.stem for p in (REPO / "jobs").glob("*.py") if p.stem != "__init__")
HEAVY = ("torch", "ray", "onnxruntime", "timm", "numpy")

PROBE = """
import argparse, contextlib, io, json, runpy, sys
parsers = []
_parse = argparse.ArgumentParser.parse_known_args
def spy(self, *a, **k):
    parsers.append(self)
    return _parse(self, *a, **k)
argparse.ArgumentParser.parse_known_args = spy
sys.argv = ["x", "--help"]
buf = io.StringIO()
code = None
with contextlib.redirect_stdout(buf):
    try:
        runpy.run_module("jobs.{job}", run_name="__main__")
    except SystemExit as e:
        code = e.code
hidden = []   # options with a value or a --x/--no-x switch whose help does not show the default
for p in parsers:
    fmt = p.formatter_class(p.prog)
    for a in p._actions:
        flag_only = a.nargs == 0 and not isinstance(a, argparse.BooleanOptionalAction)
        if a.required or flag_only or not a.option_strings:
            continue
        text = fmt._get_help_string(a) if a.help else ""
        if "%(default)" not in text:
            hidden.append(a.option_strings[-1])
print(json.dumps({{"code": code, "help": buf.getvalue(), "hidden": hidden,
                  "heavy": [m for m in {heavy!r} if m in sys.modules]}}))
"""


def _help(job: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", PROBE.format(job=job, heavy=HEAVY)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_every_job_is_covered():
    assert {"train", "cache_teacher", "evaluate", "export", "make_shards", "predict", "benchmark_t4"} <= set(JOBS)


@pytest.mark.parametrize("job", JOBS)
def test_help_is_light_complete_and_names_existing_files(job):
    got = _help(job)
    assert got["code"] in (0, None)
    assert got["heavy"] == [], f"jobs.{job} --help imported {got['heavy']}: import them after parse_args"
    text = got["help"]
    assert text.startswith(f"usage: python -m jobs.{job}")
    assert got["hidden"] == [], f"jobs.{job} --help does not show the default of {got['hidden']}"
    for ref in re.findall(r"\b(?:docs/[\w./-]+|README[\w-]*)\.md\b", text):
        assert (REPO / ref).is_file(), f"jobs.{job} --help names {ref}, which does not exist"


def test_split_flags_and_their_old_names():
    from jobs import cache_teacher, evaluate
    from pipeline.train.config import TrainConfig, add_config_flags, config_from_args
    from pipeline.cli import parser

    assert evaluate.parse_args(["--checkpoint", "m.pth", "--val-split", "test"]).split == "test"
    assert evaluate.parse_args(["--checkpoint", "m.pth", "--split", "val2017"]).split == "val2017"
    assert cache_teacher.parse_args(["--train-split", "val"]).train_split == "val"
    old = cache_teacher.parse_args(["--split", "train2017", "--input-size", "320"])   # jobs.train's names now
    assert (old.train_split, old.img_size) == ("train2017", 320) and set(old.given) == {"train_split", "img_size"}
    cfg = config_from_args(add_config_flags(parser("jobs.train", None)).parse_args(
        ["--train-split", "val", "--val-split", "test", "--name", "demo", "--exist-ok", "--patience", "3",
         "--save-period", "2"]), TrainConfig)
    assert (cfg.train_split, cfg.val_split, cfg.name, cfg.exist_ok, cfg.patience, cfg.save_period) == \
        ("val", "test", "demo", True, 3, 2)
