"""Train RT-DETRv4: ``torchrun [--nproc_per_node N] -m jobs.train --size {s,m,l,x} [...]``.

With no ``--data`` it trains the demo plan of the embedded synthetic dataset (the one
``jobs.cache_teacher`` builds without ``--data``); with no ``--weights`` the DINOv3 teacher is
randomly initialised (a loud warning says so): both only for trying the pipeline out. ``--cache
STORE`` adopts the store's plan; with no ``--cache`` a store in cache/ matching the run's plan and
teacher is used (``--cache none``: the online teacher). Every flag is a field of
``pipeline.train.config.TrainConfig``.
"""
from __future__ import annotations

import logging
import sys

from pipeline import cli
from pipeline.cli import parser
from pipeline.train.config import TrainConfig, add_config_flags, config_from_args


def parse_args(argv=None) -> TrainConfig:
    p = parser("jobs.train", __doc__)
    return config_from_args(add_config_flags(p).parse_args(argv))


def main(argv=None) -> int:
    cfg = parse_args(argv)   # before importing torch: --help and flag errors answer at once
    from pipeline.train.distributed import cleanup
    from pipeline.train.rt_co_detr import resolve_preset, run_training

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:   # a flag combination the recipe refuses answers before any data or model is read
        resolve_preset(cfg)
    except ValueError as e:
        cli.fail("jobs.train", str(e))
        return 2
    try:   # one run, or the two stages of --recipe rt-co-detr
        result = run_training(cfg)
    finally:
        cleanup()
    logging.getLogger("rtdetrv4.train").info("done: %s", result)
    return 0


if __name__ == "__main__":   # a user's mistake (data, store, checkpoint, flags) ends in one line, as in every job
    sys.exit(cli.run("jobs.train", main, on_interrupt="continue the run with --resume RUN_DIR (its last.pth: the last "
                     "epoch end, or the last --checkpoint-every step)"))
