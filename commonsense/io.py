"""Crash-safe file output for evaluation results and reports.

Final files are written to a temporary sibling, fsynced and renamed over the
target, so a reader (or a rerun after a crash) sees the old file or the new one,
never half of one. Progress logs are JSON-lines files appended and fsynced per
batch, so at most the batch in flight is lost.

Kept free of the peft fork on purpose: `commonsense` must not depend on peft
internals.
"""
import contextlib
import json
import os
import tempfile
from pathlib import Path


def _fsync_dir(directory: Path) -> None:
    # A rename is durable only once the directory entry reaches the disk (POSIX).
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path, data: bytes) -> None:
    """Write `data` to `path` atomically (temp file + fsync + os.replace)."""
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    fd, tmp_name = tempfile.mkstemp(dir=directory, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp creates 0600 files; give the result the mode a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_name, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp_name)
        raise
    _fsync_dir(directory)


def atomic_write_text(path, text: str) -> None:
    """Write UTF-8 `text` to `path` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


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
    """Copy everything printed inside the block to `path` (appended, like `tee -a`)."""
    import sys

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as log:
        tee = _Tee(sys.stdout, log)
        with contextlib.redirect_stdout(tee):
            yield
