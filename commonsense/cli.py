"""What every command line does on the way out: one path, the same exit codes everywhere.

Every CLI (finetune.py, commonsense_evaluate.py, convert_adapter.py, merge_adapter.py,
download_dora_weights.py, analyze_decomposition.py, python -m commonsense.reproduce / demo / data /
report) parses its options with :class:`OneLineErrorParser` and runs its work through :func:`run_or_exit`:

* 0   - done;
* 2   - the input is wrong (an option, a count, a file, a folder, an adapter, a model folder):
  one ``error: ...`` line on stderr holding the whole message, and nothing written. argparse's
  usage errors exit 2 too, so a misspelt flag and a nonsensical value read the same;
* 130 - interrupted (Ctrl-C): one ``error: interrupted`` line saying how to continue;
* 1   - anything else is a bug or an unexpected failure: Python's traceback, as is, since that
  is what a bug report needs.

``--debug`` turns the one-line errors back into tracebacks.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Callable, TypeVar

T = TypeVar("T")

EXIT_USER_ERROR = 2  # as argparse's usage errors
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a Ctrl-C


def add_repo_paths() -> str:
    """Put the vendored fork (``peft/src``) and the repo root first on ``sys.path``.

    First, not last: with HF peft pip-installed, appending would import HF peft, which
    has no DoraConfig (the original fork's bug).
    """
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for path in (root, os.path.join(root, "peft", "src")):
        if path in sys.path:
            sys.path.remove(path)
        sys.path.insert(0, path)
    quiet_optional_kernel_notice()
    return root


def quiet_optional_kernel_notice() -> None:
    """Keep bitsandbytes' import-time notice about an optional CPU kernel off stderr.

    transformers imports bitsandbytes whenever it is installed; on CPUs with AVX512-BF16,
    bitsandbytes then tries to fetch a faster 4-bit kernel from the hub and logs a warning
    when it cannot (always, offline). Its fallback is correct; the line would only bury
    our one-line errors. Real bitsandbytes errors still show.
    """
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse errors as one "error: " line and exit status 2 (no usage dump)."""

    def error(self, message):
        print(f"error: {message}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)


def user_error_types() -> tuple:
    """Exceptions that mean "the input or the machine is wrong" rather than "the program is wrong".

    ValueError covers this project's own errors (DataError, ModelLoadError, FinetuneError,
    EvaluationError...); OSError a missing or unwritable path, a full disk.
    """
    return (ValueError, OSError)


def close_progress_bars() -> None:
    """Close every open tqdm bar (if tqdm is loaded at all)."""
    tqdm_std = sys.modules.get("tqdm.std")
    if tqdm_std is not None:
        for bar in list(tqdm_std.tqdm._instances):
            bar.close()


def run_or_exit(main: Callable[[], T], debug: bool = False, resume_hint: str = "") -> T:
    """Run ``main``; a user error is one stderr line and exit 2, Ctrl-C one line and exit 130.

    The whole message goes on the line: an upstream message of several lines is joined, not
    cut at its first. ``resume_hint`` says how to continue after an interrupt.
    """
    try:
        return main()
    except KeyboardInterrupt:
        if debug:
            raise
        close_progress_bars()
        print("error: interrupted" + (f"; {resume_hint}" if resume_hint else ""), file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    except user_error_types() as err:
        if debug:
            raise
        message = " ".join(str(err).split()) or type(err).__name__
        close_progress_bars()  # else a bar left open by the failed loop redraws after the error line
        print(f"error: {message}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
