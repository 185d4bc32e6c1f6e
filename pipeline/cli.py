"""Command-line helpers shared by the jobs; imports nothing heavy, so ``--help`` answers at once.

One error style for every job (:func:`run`, each job's ``__main__``): a user's mistake (bad data, a
refused store or checkpoint, an unusable flag value or location) ends with one line
``jobs.X: error: <what, naming the file or flag, and the fix>`` on stderr and exit code 2; Ctrl-C ends
with one line and exit code 130; anything else (a bug) keeps its traceback.
"""
from __future__ import annotations

import argparse
import errno
import os
import re
import signal
import sys
import tempfile
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# errors our code raises for the user (a message naming the file or flag and the fix); the same types
# raised inside a library are bugs and keep their traceback
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError,
               FloatingPointError)
OUR_CODE = tuple(str(REPO / d) + os.sep for d in ("jobs", "pipeline", "detector", "teacher_cache"))
INTERRUPTED = 130   # the shell's code for a run ended by SIGINT


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Keeps the module docstring's layout and shows every flag's default."""


class JobError(ValueError):
    """A flag value or location a job refuses; the message names the flag and the fix."""


def parser(prog: str, doc: str | None) -> argparse.ArgumentParser:
    """The argument parser of ``python -m <prog>`` with its docstring as description."""
    return argparse.ArgumentParser(prog=f"python -m {prog}", description=doc, formatter_class=HelpFormatter)


def writable_folder(path: str | Path, flag: str = "--out") -> Path:
    """Prove that ``path`` can be written, before any data or model is loaded: the folder, or its
    nearest existing parent, takes a file (an anonymous temporary one: nothing is left behind, nothing
    created). A read-only mount, a path under /proc or under a file is refused at once, naming the
    flag. fsspec URLs (s3://, gs://) are left to their store."""
    text = str(path)
    if "://" in text and not text.startswith("file://"):
        return Path(text)
    folder = Path(text.removeprefix("file://")).expanduser()
    probe = next((p for p in (folder, *folder.parents) if p.exists()), Path.cwd())
    try:
        if not probe.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(probe))
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as e:
        where = "" if probe == folder else f" (at {probe})"
        raise JobError(f"{flag} {path}: cannot write there{where}: {e.strerror or e}. Fix: choose a folder on a "
                       "writable disk") from None
    return folder


def size_text(n: float) -> str:
    """A byte count people read: 3 significant digits and a decimal unit (512 B, 3.46 MB, 1.2 TB)."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 999.5:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.3g} {unit}"
        n /= 1000
    return f"{n:,.3g} PB"


def user_message(error: BaseException) -> str | None:
    """The message of an error our code raised for the user, or None (a library's error, a bug).

    An error from a DataLoader worker arrives re-raised with the worker's traceback as its text
    (``Caught X in DataLoader worker process N. Original Traceback ...``): its own message is taken
    from the end of that traceback."""
    if not isinstance(error, USER_ERRORS):
        return None
    text = str(error)
    original = text.partition("Original Traceback (most recent call last):\n")[2]
    if original:
        frames = re.findall(r'^  File "([^"]+)"', original, flags=re.M)
        names = (f"{type(error).__module__}.{type(error).__qualname__}: ", f"{type(error).__name__}: ")
        starts = [m.end() for name in names for m in re.finditer(f"^{re.escape(name)}", original, flags=re.M)]
        if not frames or not frames[-1].startswith(OUR_CODE) or not starts:
            return None
        return original[max(starts):].strip()
    tb = error.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is None or not tb.tb_frame.f_code.co_filename.startswith(OUR_CODE):
        return None
    return text.strip()


def run(prog: str, main, argv=None, on_interrupt: str = "") -> int:
    """Run a job's ``main(argv)`` and return its exit code (an int result, else 0), in the one error
    style of the jobs (see the module docstring). ``on_interrupt`` says how to continue after Ctrl-C."""
    interrupted = []

    def on_sigint(signum, frame):
        interrupted.append(signum)
        raise KeyboardInterrupt

    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, on_sigint) if main_thread else None
    try:
        result = main(argv)
    except KeyboardInterrupt:
        return _interrupted(prog, on_interrupt)
    except Exception as e:  # noqa: BLE001 - sorted into the user's mistakes and the rest
        if interrupted:   # e.g. "DataLoader worker exited unexpectedly": the Ctrl-C reached the workers first
            return _interrupted(prog, on_interrupt)
        message = user_message(e)
        if message is None:
            raise
        fail(prog, message)
        return 2
    finally:
        if main_thread:
            signal.signal(signal.SIGINT, previous)
    return result if isinstance(result, int) and not isinstance(result, bool) else 0


def fail(prog: str, message: str) -> None:
    """The one error line of a job: ``jobs.X: error: message`` on stderr, on a line of its own."""
    _close_progress_bars()
    print(f"{prog}: error: {message}", file=sys.stderr)


def _interrupted(prog: str, how: str) -> int:
    _close_progress_bars()
    print(f"{prog}: interrupted (Ctrl-C)" + (f"; {how}" if how else ""), file=sys.stderr)
    return INTERRUPTED


def _close_progress_bars() -> None:
    """End the tqdm bars an error left open (their line ends; the message starts on its own)."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ())):
        bar.close()
