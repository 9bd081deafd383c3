"""Crash-safe file output for evaluation results and reports.

Final files are written to a temporary sibling, fsynced and renamed over the
target, so a reader (or a rerun after a crash) sees the old file or the new one,
never half of one: the fork's helper (``peft.utils.io``), the project's only one.
Progress logs are JSON-lines files appended and fsynced per batch, so at most the
batch in flight is lost.
"""
import contextlib
import functools
import json
import os
import signal
from pathlib import Path

TEST_KILL_ENV = "DORA_TEST_KILL_AT"


@functools.lru_cache(maxsize=None)
def _fork_io():
    """The fork's ``peft.utils.io``, imported on the first write.

    Importing the fork loads torch (about 1.5 s), which the light CLIs (``commonsense.data``,
    ``commonsense.report``) should pay only when they write; the fork comes first on
    ``sys.path`` so a pip-installed HF peft is never picked instead.
    """
    from commonsense.cli import add_repo_paths

    add_repo_paths()
    from peft.utils import io

    return io


def fsync_files(directory) -> None:
    """fsync every regular file in `directory` (before marking what they form complete)."""
    for entry in os.scandir(directory):
        if entry.is_file(follow_symlinks=False):
            with open(entry.path, "rb") as f:
                os.fsync(f.fileno())
    _fork_io().fsync_dir(directory)


def atomic_write_bytes(path, data: bytes) -> None:
    """Write `data` to `path` atomically (temp file + fsync + os.replace); the folder must exist."""
    _fork_io().atomic_write_bytes(path, data)


def atomic_write_text(path, text: str) -> None:
    """Write UTF-8 `text` to `path` atomically."""
    _fork_io().atomic_write_text(path, text)


def atomic_write_json(path, value, indent=4) -> None:
    """json.dump(value, indent=indent) to `path` atomically (the original's layout: indent=4)."""
    atomic_write_text(path, json.dumps(value, indent=indent))


def append_jsonl(path, records) -> None:
    """Append one JSON line per record and fsync, so finished work survives a crash."""
    lines = "".join(json.dumps(record) + "\n" for record in records)
    with open(path, "a", encoding="utf-8") as f:
        f.write(lines)
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path) -> list:
    """Records of a JSON-lines file; stops at the first unparsable line (a torn last write)."""
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.endswith("\n"):
                break  # the crash happened mid-write: this line is incomplete
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return records


# --------------------------------------------------------------------------- where outputs may go

class OutputPathError(ValueError):
    """An output location that is unusable or would escape its folder; one-line message."""


def child_path(directory, name: str, what: str = "file name") -> Path:
    """`directory / name`, where `name` must be one plain path component.

    Output names are built from option and config values (model, adapter and task
    names, ...); a "/", "\\" or ".." in one must not write outside `directory`.
    """
    name = str(name)
    if name in ("", ".", "..") or any(c in name for c in ("/", "\\", "\0")):
        raise OutputPathError(f"{what} {name!r} is not a plain file name (no '/', '\\' or '..' allowed)")
    return Path(directory) / name


def check_writable_dir(path, what: str = "output folder") -> None:
    """Fail early, creating nothing, when `path` cannot be (or become) a writable folder."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputPathError(f"{what} {path} exists and is not a folder")
    existing = path.absolute()
    while not existing.exists():  # the nearest existing ancestor is where the folder would be made
        existing = existing.parent
    if not existing.is_dir():
        raise OutputPathError(f"cannot create {what} {path}: {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputPathError(f"{what} {path} is not writable ({existing} does not allow writing)")


# --------------------------------------------------------------------------- crash tests

def kill_point(name: str, number: int) -> None:
    """Test-only: SIGKILL this process when DORA_TEST_KILL_AT is "<name>:<number>".

    The crash-safety tests (tests/test_crash_safety.py) use it to die at exact points
    instead of after sleeps. Unset (always, outside those tests), it does nothing.
    """
    if os.environ.get(TEST_KILL_ENV) == f"{name}:{number}":
        os.kill(os.getpid(), signal.SIGKILL)


class _Tee:
    """A text stream writing to two streams (the console and a log file)."""

    def __init__(self, first, second):
        self.first, self.second = first, second

    def write(self, text):
        self.first.write(text)
        self.second.write(text)
        return len(text)

    def flush(self):
        self.first.flush()
        self.second.flush()


@contextlib.contextmanager
def tee_stdout(path):
    """Copy everything printed inside the block to `path` (appended, like `tee -a`).

    Yields the log file, for what should go to the log alone (through the same handle, so the
    two stay in order)."""
    import sys

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as log:
        tee = _Tee(sys.stdout, log)
        with contextlib.redirect_stdout(tee):
            yield log
