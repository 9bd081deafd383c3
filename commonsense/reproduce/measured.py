"""Run a step of the comparison as a child process: its output to a log, its wall time and peak memory."""
from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from commonsense.reproduce.plan import REPO_ROOT


def _copy_output(pipe, log, echo: bool) -> None:
    """Copy a child's output to its log file (and to our stdout) as it arrives."""
    while True:
        chunk = os.read(pipe.fileno(), 65536)
        if not chunk:
            return
        log.write(chunk)
        log.flush()
        if echo:
            stream = getattr(sys.stdout, "buffer", None)
            if stream is not None:
                stream.write(chunk)
            else:
                sys.stdout.write(chunk.decode("utf-8", errors="replace"))
            sys.stdout.flush()


def run_measured(command: list, log_path: Path, peak_json: Path = None, echo: bool = True, env: dict = None) -> dict:
    """Run `command` from the repository root; return its exit status, wall time and peak memory.

    Peak memory comes from `peak_json` when the command is a :func:`measured_command` (the
    child's own VmHWM, and its CUDA peak). Otherwise it is os.wait4's ru_maxrss for exactly this
    child (RUSAGE_CHILDREN would be a maximum over every child so far), which on Linux also
    counts this process's own size when the child was started: an upper bound only.
    `env` is added to this process's environment (a slot's CUDA_VISIBLE_DEVICES).
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1", **(env or {}))
    with open(log_path, "ab") as log:
        log.write(f"$ {shlex.join(command)}\n".encode())
        log.flush()
        started = time.perf_counter()
        child = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        copier = threading.Thread(target=_copy_output, args=(child.stdout, log, echo), daemon=True)
        copier.start()
        try:
            _, status, usage = os.wait4(child.pid, 0)
        except BaseException:  # Ctrl-C: stop the child too, then let the interrupt through
            child.kill()
            child.wait()
            raise
        child.returncode = os.waitstatus_to_exitcode(status)  # reaped here; Popen must not wait again
        wall = time.perf_counter() - started
        copier.join()
        child.stdout.close()
    rss_unit = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    peaks = read_peaks(peak_json) if peak_json is not None else {}
    return {"returncode": child.returncode, "wall_s": round(wall, 1),
            "max_rss_bytes": peaks.get("peak_rss_bytes") or usage.ru_maxrss * rss_unit,
            "cuda_peak_bytes": peaks.get("cuda_peak_bytes")}


def measured_command(peak_json: Path, script: str, script_args: list) -> list:
    """python -m commonsense.measure PEAK_JSON SCRIPT ARGS: the script as usual, plus its peak memory."""
    return [sys.executable, "-m", "commonsense.measure", str(peak_json), script, *script_args]


def free_port() -> int:
    """A TCP port nobody listens on now (for a DDP rendezvous; taken again only by a race)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def ddp_measured_command(processes: int, peak_json: Path, script: str, script_args: list) -> list:
    """The script on `processes` GPUs with DDP (torch.distributed.run), each rank under commonsense.measure.

    Every rank writes PEAK_JSON, so it holds one rank's peaks (the ranks are alike under DDP).
    """
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(processes),
            "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
            "-m", "commonsense.measure", str(peak_json), script, *script_args]


def read_peaks(peak_json: Path) -> dict:
    """What commonsense.measure wrote ({} if the child died before writing it)."""
    try:
        return json.loads(Path(peak_json).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
