r"""The benchmarks' shared harness: one peft per worker process, interleaved timing, peak memory, results.

Both this repo's fork and HF peft import as ``peft``, so every measurement runs in its own
child process: the parent starts each :class:`Worker` with an environment without
``PYTHONPATH``, and a worker calls :func:`select_peft` before importing anything, so "ours"
workers find ``peft/src`` first and the others find HF peft. Workers of one configuration stay
alive side by side and idle on stdin; :func:`run_interleaved` asks each in turn, in a rotating
order (ABAB...), for one timed iteration per round, so slow drifts of the machine hit every
implementation alike. Reported times are medians over the rounds.

Peak memory (:func:`measure_peak_bytes`): on CUDA, ``torch.cuda.max_memory_allocated()`` minus
the allocation before the iteration. On CPU, ``LiveTensorBytes``, a ``TorchDispatchMode`` that
sees every op (autograd's backward included), counts the bytes of each *new* storage an op
returns (one not shared with its inputs: views and in-place results are not new) and subtracts
them when a ``weakref.finalize`` on the storage fires (storages keep their Python object alive
while C++ holds them, so that is when the memory is really freed). The peak of that live total
over one iteration is reported: bytes allocated by tensors during the iteration, above what
existed before it. It is measured in a separate, untimed iteration.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import weakref
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
OUR_PEFT_SRC = REPO_ROOT / "peft" / "src"
DEFAULT_RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
if str(REPO_ROOT) not in sys.path:
    sys.path.append(str(REPO_ROOT))  # for commonsense; appended, so it never shadows the chosen peft


# ============================================================================================
# Memory tracking
# ============================================================================================
def _make_live_tensor_bytes_class():
    """Built lazily so the parent process never needs torch internals at import time."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    class LiveTensorBytes(TorchDispatchMode):
        """Tracks the bytes of storages created by ops run under it; ``peak_bytes`` is the max."""

        def __init__(self):
            super().__init__()
            self.live_bytes = 0
            self.peak_bytes = 0
            self._tracked_ptrs = set()

        def _release(self, ptr: int, nbytes: int) -> None:
            if ptr in self._tracked_ptrs:
                self._tracked_ptrs.discard(ptr)
                self.live_bytes -= nbytes

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            inputs, _ = tree_flatten((args, kwargs))
            input_ptrs = {t.untyped_storage().data_ptr() for t in inputs if isinstance(t, torch.Tensor)}
            outputs, _ = tree_flatten(out)
            for t in outputs:
                if not isinstance(t, torch.Tensor):
                    continue
                storage = t.untyped_storage()
                ptr, nbytes = storage.data_ptr(), storage.nbytes()
                if nbytes == 0 or ptr in input_ptrs or ptr in self._tracked_ptrs:
                    continue
                self._tracked_ptrs.add(ptr)
                self.live_bytes += nbytes
                self.peak_bytes = max(self.peak_bytes, self.live_bytes)
                weakref.finalize(storage, self._release, ptr, nbytes)
            return out

    return LiveTensorBytes


def measure_peak_bytes(run_once, device: str) -> int:
    """Peak bytes allocated by tensors while ``run_once()`` runs, above what existed before."""
    import gc

    import torch

    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        run_once()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    tracker = _make_live_tensor_bytes_class()()
    with tracker:
        run_once()
    return tracker.peak_bytes


def synchronize(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


# ============================================================================================
# Worker processes
# ============================================================================================
def child_environment() -> dict:
    """The parent's environment without PYTHONPATH, so each child picks its own ``peft``."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    return env


def select_peft(implementation: str) -> None:
    """In a worker: make ``import peft`` find our fork ("ours_*") or HF peft (anything else)."""
    our_src = str(OUR_PEFT_SRC)
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != OUR_PEFT_SRC]
    if implementation.startswith("ours"):
        sys.path.insert(0, our_src)


def check_peft_origin(implementation: str) -> str:
    import peft

    origin = str(Path(peft.__file__).resolve())
    ours = origin.startswith(str(OUR_PEFT_SRC))
    if ours != implementation.startswith("ours"):
        raise RuntimeError(f"{implementation}: imported the wrong peft from {origin}")
    return origin


class Worker:
    """A child process running one measurement; answers ``time N`` with N iteration times."""

    def __init__(self, name: str, argv: list):
        self.name = name
        self.process = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=child_environment(), cwd=REPO_ROOT
        )
        self.ready_info = None
        self.kernel_path = None  # this repo's DoRA kernels: "triton" or "torch (...)"; None for others

    def _read_json(self) -> dict:
        while True:
            line = self.process.stdout.readline()
            if not line:
                raise RuntimeError(f"worker {self.name} exited (rc={self.process.wait()})")
            if line.startswith("{"):
                return json.loads(line)

    def wait_ready(self) -> dict:
        self.ready_info = self._read_json()
        return self.ready_info

    def time_iterations(self, count: int) -> list:
        self.process.stdin.write(f"time {count}\n")
        self.process.stdin.flush()
        reply = self._read_json()
        self.kernel_path = reply.get("kernel_path")
        return reply["seconds"]

    def close(self) -> None:
        try:
            self.process.stdin.write("quit\n")
            self.process.stdin.flush()
        except (BrokenPipeError, ValueError):
            pass
        self.process.wait(timeout=60)


def worker_serve(run_iteration, device: str, ready_info: dict) -> None:
    """Worker side of :class:`Worker`: print the ready line, then time iterations on request."""
    print(json.dumps(ready_info), flush=True)
    for line in sys.stdin:
        command = line.split()
        if not command or command[0] == "quit":
            break
        if command[0] == "time":
            seconds = []
            for _ in range(int(command[1])):
                synchronize(device)
                start = time.perf_counter()
                run_iteration()
                synchronize(device)
                seconds.append(time.perf_counter() - start)
            print(json.dumps({"seconds": seconds, "kernel_path": kernel_path(device)}), flush=True)


def kernel_path(device: str):
    """Which path this repo's DoRA elementwise passes took in this worker (None where the worker
    runs HF peft or no DoRA of ours); recorded, since a Triton failure switches to torch."""
    kernels = sys.modules.get("peft.tuners.dora_triton")
    return kernels.kernel_path(device) if kernels is not None else None


def run_interleaved(workers: list, rounds: int, iterations_per_round: int = 1) -> dict:
    """ABAB timing: each round asks every worker once, the order rotating between rounds."""
    seconds = {w.name: [] for w in workers}
    for round_index in range(rounds):
        shift = round_index % len(workers)
        for worker in workers[shift:] + workers[:shift]:
            seconds[worker.name].extend(worker.time_iterations(iterations_per_round))
    return seconds


# ============================================================================================
# The record
# ============================================================================================
def machine_info() -> dict:
    """commonsense.machine's record, plus the HF peft version the "hf_*" workers compare against."""
    from importlib import metadata

    from commonsense.machine import machine_info as common_machine_info

    info = common_machine_info()
    try:
        info["hf_peft"] = metadata.version("peft")
    except metadata.PackageNotFoundError:
        info["hf_peft"] = None
    return info


def write_result(path, result: dict) -> None:
    """The benchmark's JSON record (its folder created), replaced whole: never a half-written file.

    Not through commonsense.io: that writes with the fork's helper, and in this parent process
    ``peft`` may be HF peft (the workers choose theirs).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, path)
    print(f"wrote {path}")
