"""Run one of the project's entry scripts as ``__main__`` and record its peak memory.

    python -m commonsense.measure PEAK_JSON SCRIPT [ARGS...]

runs ``SCRIPT ARGS...`` exactly as ``python SCRIPT ARGS...`` would (same ``sys.argv``, same
exit status) and, however it ends, writes to PEAK_JSON

* ``peak_rss_bytes``: the process's peak resident memory, VmHWM of /proc/self/status (null
  where there is no /proc). Not ``ru_maxrss``: on Linux a child started with vfork/exec
  (as subprocess does) inherits its parent's high-water mark in ru_maxrss, so a small child
  of a big parent would report the parent's size;
* ``cuda_peak_bytes``: ``torch.cuda.max_memory_allocated()`` when the script used CUDA, else null.
"""
from __future__ import annotations

import runpy
import sys

from commonsense.io import atomic_write_json


def cuda_peak_bytes():
    """Peak CUDA memory allocated by torch in this process, or None without CUDA use."""
    torch = sys.modules.get("torch")  # never import torch just to find out it was not used
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    return int(torch.cuda.max_memory_allocated())


def peak_rss_bytes():
    """VmHWM (peak resident set of this process's own address space), or None without /proc."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # reported in kB
    except OSError:
        pass
    return None


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 2:
        print("usage: python -m commonsense.measure PEAK_JSON SCRIPT [ARGS...]", file=sys.stderr)
        return 2
    peak_json, script = argv[0], argv[1]
    sys.argv = [script, *argv[2:]]
    status = 0
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as exit_:
        status = exit_.code
    finally:
        atomic_write_json(peak_json, {"peak_rss_bytes": peak_rss_bytes(), "cuda_peak_bytes": cuda_peak_bytes()},
                          indent=2)
    return status


if __name__ == "__main__":
    sys.exit(main())
