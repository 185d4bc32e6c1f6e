"""Command-line helpers shared by the jobs; imports nothing heavy, so ``--help`` answers at once."""
from __future__ import annotations

import argparse


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Keeps the module docstring's layout and shows every flag's default."""


def parser(prog: str, doc: str | None) -> argparse.ArgumentParser:
    """The argument parser of ``python -m <prog>`` with its docstring as description."""
    return argparse.ArgumentParser(prog=f"python -m {prog}", description=doc, formatter_class=HelpFormatter)
