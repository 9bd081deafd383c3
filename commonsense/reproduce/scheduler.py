"""Run a grid's jobs over the GPUs: one job per GPU at a time, trainings over groups of GPUs.

A job is a training or an evaluation with the jobs it waits for, a function that runs it on a
:class:`Slot` (raising when it fails) and a function that says whether it is already done (a
rerun skips it). The dispatcher (this thread) starts every ready job that fits the free GPUs
on a thread of its own; a job that fails is retried once, then reported, and the jobs that
wait for it are skipped. Without GPUs, one job runs at a time. Every attempt goes into the
grid record (JSON, rewritten atomically after each attempt starts and ends).
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from commonsense.io import atomic_write_json
from commonsense.reproduce.plan import ReproductionError

ATTEMPTS = 2  # a crashed job is retried once


class JobFailed(Exception):
    """A job's child process exited non-zero (or its output was incomplete)."""

    def __init__(self, message: str, returncode=None):
        super().__init__(message)
        self.returncode = returncode


# ---- GPUs ----------------------------------------------------------------------------------------
def visible_gpu_count() -> int:
    """CUDA devices this process sees (tests replace it to simulate GPUs on a CPU)."""
    import torch

    return torch.cuda.device_count()


def parse_gpus(text) -> list:
    """'0,1,2,3' -> [0, 1, 2, 3]; one clear line for anything else."""
    parts = [part.strip() for part in str(text).split(",")]
    if not all(part.isdigit() for part in parts):
        raise ReproductionError(f"--gpus must be comma-separated GPU ids such as 0,1,2,3, got {text!r}")
    gpus = [int(part) for part in parts]
    if len(set(gpus)) != len(gpus):
        raise ReproductionError(f"--gpus lists a GPU twice: {text}")
    return gpus


def check_gpus(gpus: list, gpus_per_run: int) -> None:
    """The ids exist on this machine and split into groups of --gpus_per_run."""
    if gpus_per_run < 1:
        raise ReproductionError(f"--gpus_per_run must be a positive integer, got {gpus_per_run}")
    if not gpus:
        if gpus_per_run != 1:
            raise ReproductionError("--gpus_per_run needs --gpus")
        return
    count = visible_gpu_count()
    missing = [gpu for gpu in gpus if gpu >= count]
    if missing:
        raise ReproductionError(f"--gpus {','.join(map(str, gpus))}: no GPU {','.join(map(str, missing))} on this "
                                f"machine (it has {count}{': ids 0-' + str(count - 1) if count else ''})")
    if len(gpus) % gpus_per_run:
        raise ReproductionError(f"--gpus_per_run {gpus_per_run} does not divide the {len(gpus)} GPUs of --gpus")


def _physical_ids(gpus) -> list:
    """Ids as a child's CUDA_VISIBLE_DEVICES must name them: through ours, if we were given one."""
    ours = os.environ.get("CUDA_VISIBLE_DEVICES")
    if not ours:
        return [str(gpu) for gpu in gpus]
    visible = [part.strip() for part in ours.split(",")]
    return [visible[gpu] for gpu in gpus]


@dataclass(frozen=True)
class Slot:
    """The devices one job runs on: some GPUs, or () for the machine's default devices (a CPU)."""

    gpus: tuple = ()

    @property
    def label(self) -> str:
        if not self.gpus:
            return "cpu"
        return ("gpu " if len(self.gpus) == 1 else "gpus ") + ",".join(map(str, self.gpus))

    def env(self) -> dict:
        return {"CUDA_VISIBLE_DEVICES": ",".join(_physical_ids(self.gpus))} if self.gpus else {}


# ---- jobs and the record ---------------------------------------------------------------------
@dataclass
class Job:
    key: str  # "train dora_r4_lr2e-4_s0", "eval loglik base"
    kind: str  # "train" (a whole group of GPUs) or "eval" (one GPU)
    run: Callable[[Slot], None]  # raises on failure
    finished: Callable[[], bool] = lambda: False
    after: tuple = ()
    info: dict = field(default_factory=dict)  # recorded with each attempt (run, mode)


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


class GridRecord:
    """grid_record.json: every attempt of every job, across reruns."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.lock = threading.Lock()
        self.data = json.loads(self.path.read_text(encoding="utf-8")) if self.path.exists() else {"attempts": []}
        self.host = socket.gethostname()

    def start(self, job: Job, slot: Slot, attempt: int) -> dict:
        entry = {"job": job.key, "kind": job.kind, **job.info, "attempt": attempt, "slot": slot.label,
                 "gpus": list(slot.gpus), "host": self.host, "start_utc": utc_now(), "end_utc": None,
                 "wall_s": None, "returncode": None}
        with self.lock:
            self.data["attempts"].append(entry)
            self._write()
        return entry

    def end(self, entry: dict, wall_s: float, returncode, error: str = None) -> None:
        with self.lock:
            entry.update(end_utc=utc_now(), wall_s=round(wall_s, 1), returncode=returncode)
            if error:
                entry["error"] = error
            self._write()

    def _write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.path, self.data, indent=1)


# ---- the dispatcher --------------------------------------------------------------------------------
class Scheduler:
    def __init__(self, jobs: list, record: GridRecord, gpus=None, gpus_per_run: int = 1,
                 on_finish: Callable[[Job], None] = None, say: Callable[[str], None] = print):
        keys = [job.key for job in jobs]
        if len(set(keys)) != len(keys):
            raise ValueError("two jobs with one key")
        self.jobs, self.record, self.say = list(jobs), record, say
        self.on_finish = on_finish or (lambda job: None)
        self.gpus = list(gpus or [])
        self.groups = [tuple(self.gpus[i:i + gpus_per_run]) for i in range(0, len(self.gpus), gpus_per_run)]
        self.busy = set()  # GPUs in use; "cpu" for the one slot without GPUs
        self.status = {}  # key -> "done" (ran now), "skipped" (done before), "failed", "blocked"
        self.errors = {}
        self.running = 0  # jobs started and not yet finished
        self.cond = threading.Condition()

    # Evaluations first: their results show early; a training waits only for a whole free group.
    def _slot_for(self, job: Job):
        if not self.gpus:
            return None if "cpu" in self.busy else Slot()
        if job.kind == "train":
            for group in self.groups:
                if not self.busy.intersection(group):
                    return Slot(group)
            return None
        free = [gpu for gpu in self.gpus if gpu not in self.busy]
        return Slot((free[0],)) if free else None

    def _take(self, slot: Slot) -> None:
        self.busy.update(slot.gpus or ["cpu"])

    def _release(self, slot: Slot) -> None:
        self.busy.difference_update(slot.gpus or ["cpu"])

    def run(self) -> dict:
        """Run every job; return {key: status}. Failed jobs raise nothing here (see :meth:`failures`)."""
        pending = sorted(self.jobs, key=lambda job: job.kind != "eval")  # stable: evaluations first
        with self.cond:
            while pending or self.running:
                while self._dispatch(pending):  # again while a pass settles something: a skip frees its waiters
                    pass
                if self.running:
                    self.cond.wait()
                elif pending:  # nothing runs and nothing can start: a wait for a job not in the grid
                    raise ReproductionError(f"{pending[0].key} waits for jobs not in the grid: {pending[0].after}")
        return dict(self.status)

    def _dispatch(self, pending: list) -> bool:
        """One pass over the pending jobs (under the lock): settle or start what can be; True if any was."""
        progress = False
        for job in list(pending):
            states = [self.status.get(key) for key in job.after]
            if any(state in ("failed", "blocked") for state in states):
                self.status[job.key] = "blocked"
                self.say(f"skipping {job.key}: {', '.join(job.after)} failed")
            elif not all(state in ("done", "skipped") for state in states):
                continue
            elif job.finished():
                self.status[job.key] = "skipped"
                self.say(f"{job.key}: already done; skipping")
            else:
                slot = self._slot_for(job)
                if slot is None:
                    continue
                self._take(slot)
                self.running += 1
                threading.Thread(target=self._work, args=(job, slot), daemon=True, name=job.key).start()
            pending.remove(job)
            progress = True
        return progress

    def _work(self, job: Job, slot: Slot) -> None:
        ok = False
        for attempt in range(1, ATTEMPTS + 1):
            self.say(f"[{slot.label}] {job.key}" + (f" (attempt {attempt})" if attempt > 1 else ""))
            entry = self.record.start(job, slot, attempt)
            started = time.perf_counter()
            returncode, error = 0, None
            try:
                job.run(slot)
            except JobFailed as failure:
                returncode, error = failure.returncode, str(failure)
            except Exception as failure:  # noqa: BLE001 - any crash of a job is that job's failure
                returncode, error = None, f"{type(failure).__name__}: {failure}"
            wall = time.perf_counter() - started
            self.record.end(entry, wall, returncode, error)
            if error is None:
                ok = True
                self.say(f"[{slot.label}] {job.key}: done in {wall:.0f} s")
                break
            self.say(f"[{slot.label}] {job.key} failed (attempt {attempt} of {ATTEMPTS}): {error}")
            self.errors[job.key] = error
        if ok:
            try:
                self.on_finish(job)
            except Exception as failure:  # noqa: BLE001 - a report error must not stop the grid
                self.say(f"after {job.key}: {type(failure).__name__}: {failure}")
        with self.cond:
            self.status[job.key] = "done" if ok else "failed"
            self._release(slot)
            self.running -= 1
            self.cond.notify_all()

    def failures(self) -> list:
        return [(key, self.errors.get(key, "")) for key, state in self.status.items() if state == "failed"]
