"""Shared entry-point behaviour: user mistakes become one ``error:`` line and exit code 2."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Callable, TypeVar

T = TypeVar("T")

EXIT_USER_ERROR = 2


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
    """Exceptions that mean "the input is wrong" rather than "the program is wrong"."""
    return (ValueError, FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


def close_progress_bars() -> None:
    """Close every open tqdm bar (if tqdm is loaded at all)."""
    tqdm_std = sys.modules.get("tqdm.std")
    if tqdm_std is not None:
        for bar in list(tqdm_std.tqdm._instances):
            bar.close()


def run_or_exit(main: Callable[[], T], debug: bool = False) -> T:
    """Run ``main``; on a user error print one line to stderr and exit 2 (traceback with debug)."""
    try:
        return main()
    except user_error_types() as err:
        if debug:
            raise
        message = " ".join(str(err).split()) or type(err).__name__
        close_progress_bars()  # else a bar left open by the failed loop redraws after the error line
        print(f"error: {message}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
