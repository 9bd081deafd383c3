"""Run the grid: each run trained (finetune.py) and evaluated (commonsense_evaluate.py) as child processes.

A run's state lives in its folder, ``OUTPUT_DIR/<run>/summary.json``: a step already recorded
there is skipped, so a rerun of the same command resumes (an interrupted finetune.py from its
last checkpoint, an interrupted evaluation from its per-example log). The jobs go through
:mod:`~commonsense.reproduce.scheduler` (one per GPU, or one at a time without GPUs); two
evaluations of one run may run at once, so its summary is updated under the run's lock. The
report is rewritten after every evaluation, so a long grid shows its results so far.
"""
from __future__ import annotations

import json
import shutil
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path

from commonsense.embedded_model import prepare_embedded_model
from commonsense.io import atomic_write_json
from commonsense.machine import machine_info
from commonsense.reproduce.grid import grid_jobs
from commonsense.reproduce.measured import ddp_measured_command, measured_command, run_measured
from commonsense.reproduce.plan import (
    BASE_MODEL,
    ReproductionError,
    RunSpec,
    Settings,
    evaluate_args,
    finetune_args,
    model_name,
    task_names,
)
from commonsense.reproduce.rank_table import rank_table
from commonsense.reproduce.report import collect, duration, per_task_counts, task_columns, write_report
from commonsense.reproduce.scheduler import GridRecord, Job, JobFailed, Scheduler, Slot
from commonsense.reproduce.training_data import prepare_training_data

CONFIG_FILE = "reproduction_config.json"  # marks a folder as this package's output (see --fresh)
RECORD_FILE = "grid_record.json"


# ---- the output folder -------------------------------------------------------------------------
def check_or_record_settings(out: Path, settings: Settings, record: bool = True) -> None:
    """Refuse to mix results of different settings in one folder; record them the first time.

    Only the settings every run shares are compared: a folder's grid may gain methods, ranks,
    lrs and seeds."""
    path = out / CONFIG_FILE
    wanted = asdict(settings)
    if path.exists():
        recorded = json.loads(path.read_text(encoding="utf-8"))
        changed = [f"{key} {recorded.get(key)!r} -> {value!r}" for key, value in wanted.items()
                   if recorded.get(key) != value]
        if changed:
            raise ReproductionError(f"{out} holds runs made with other settings ({'; '.join(changed)}); "
                                    "rerun with --fresh or choose another --output_dir")
        return
    if not record:
        return
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, wanted, indent=2)


def remove_previous_outputs(out: Path) -> None:
    """--fresh: delete OUTPUT_DIR, but only if it is this package's folder (or empty)."""
    if not out.exists():
        return
    if not out.is_dir():
        raise ReproductionError(f"--output_dir {out} exists and is not a folder")
    if not (out / CONFIG_FILE).exists() and any(out.iterdir()):
        raise ReproductionError(f"--fresh: {out} is not a reproduction output folder (no {CONFIG_FILE}); "
                                "not deleting it")
    shutil.rmtree(out)


# ---- one run's folder ------------------------------------------------------------------------------
class RunFolder:
    """OUTPUT_DIR/<run>: its summary.json, read and updated under the run's lock."""

    def __init__(self, out: Path, spec: RunSpec, settings: Settings):
        self.spec, self.settings = spec, settings
        self.path = out / spec.name
        self.lock = threading.Lock()

    def summary(self) -> dict:
        path = self.path / "summary.json"
        if path.exists():
            return json.loads(path.read_text(encoding="utf-8"))
        spec = self.spec
        return {"run": spec.name, "method": spec.method, "adapter": spec.adapter, "r": spec.r, "alpha": spec.alpha,
                "learning_rate": spec.learning_rate, "seed": spec.seed,
                "model_label": spec.label(self.settings.base_model), "eval": {}}

    def update(self, change) -> None:
        """Apply `change` to the summary on disk (not to a stale copy) and save it atomically."""
        with self.lock:
            summary = self.summary()
            change(summary)
            self.path.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self.path / "summary.json", summary, indent=2)

    def trained(self) -> bool:
        return "train" in self.summary()

    def evaluated(self, mode: str) -> bool:
        return mode in self.summary()["eval"]


def train_run(folder: RunFolder, data: dict, slot: Slot, echo: bool) -> None:
    """Fine-tune one run with finetune.py on the slot's devices (DDP over several GPUs); record the costs."""
    spec, settings, run_dir = folder.spec, folder.settings, folder.path
    adapter_dir = run_dir / "adapter"
    rows = settings.trained_rows(data["rows"])
    total_steps = settings.total_steps(data["rows"])
    processes = max(1, len(slot.gpus))
    args = finetune_args(spec, settings, data["path"], adapter_dir, total_steps, processes)
    resumed = any(adapter_dir.glob("checkpoint-*"))
    print(f"[{spec.name}] fine-tuning: {total_steps} steps on {rows} rows"
          + (f" over {processes} GPUs" if processes > 1 else "")
          + (" (resuming from the last checkpoint)" if resumed else ""), flush=True)
    peak_json = run_dir / "train_peak_memory.json"
    log_path = run_dir / "train.log"
    command = (measured_command(peak_json, "finetune.py", args) if processes == 1
               else ddp_measured_command(processes, peak_json, "finetune.py", args))
    result = run_measured(command, log_path, peak_json, echo=echo, env=slot.env())
    if result["returncode"] != 0:
        raise JobFailed(f"finetune.py exited {result['returncode']}; see {log_path}", result["returncode"])
    train_log = json.loads((adapter_dir / "train_log.json").read_text(encoding="utf-8"))
    record = {
        "command": ["python", "finetune.py", *args],
        "rows": rows,
        "planned_steps": total_steps,
        "global_step": train_log["global_step"],
        "warmup_steps": int(args[args.index("--warmup_steps") + 1]),
        "loss": [[entry["step"], entry["loss"]] for entry in train_log["log_history"] if "loss" in entry],
        "wall_s": result["wall_s"],
        "trainer_s": train_log.get("train_seconds"),
        "max_rss_bytes": result["max_rss_bytes"],
        "cuda_peak_bytes": result["cuda_peak_bytes"] or train_log.get("peak_gpu_memory_bytes"),
        "processes": processes,
        "resumed": resumed,
    }
    folder.update(lambda summary: summary.__setitem__("train", record))
    for checkpoint in adapter_dir.glob("checkpoint-*"):  # the final weights are saved; free the disk
        shutil.rmtree(checkpoint, ignore_errors=True)


def _task_files(folder: RunFolder, task: str, mode: str) -> tuple:
    from commonsense.evaluation import RunInfo, result_path, summary_path

    run = RunInfo(model_name=model_name(folder.settings.base_model), adapter=folder.spec.display_adapter)
    result = result_path(folder.path / "eval", run, task, mode)
    return result, summary_path(result)


def _finished_task(folder: RunFolder, task: str, mode: str):
    """The task's evaluation record if it is finished with the wanted settings, else None."""
    result_file, summary_file = _task_files(folder, task, mode)
    if not (result_file.exists() and summary_file.exists()):
        return None
    task_summary = json.loads(summary_file.read_text(encoding="utf-8"))
    if task_summary.get("mode") != mode or task_summary.get("limit") != folder.settings.eval_limit(mode):
        return None
    flags = "".join("1" if row["flag"] else "0" for row in json.loads(result_file.read_text(encoding="utf-8")))
    if len(flags) != task_summary["n"]:
        return None
    return {"correct": task_summary["correct"], "n": task_summary["n"], "accuracy": task_summary["accuracy"],
            "flags": flags}


def evaluate_run(folder: RunFolder, mode: str, eval_batch_size: int, slot: Slot, echo: bool) -> None:
    """Evaluate one run in one mode with commonsense_evaluate.py (only the tasks not yet done)."""
    spec, settings, run_dir = folder.spec, folder.settings, folder.path
    pending = [task for task in task_names() if _finished_task(folder, task, mode) is None]
    record = {"wall_s": 0.0, "max_rss_bytes": None, "cuda_peak_bytes": None, "resumed": len(pending) < len(task_names())}
    if pending:
        limit = settings.eval_limit(mode)
        print(f"[{spec.name}] evaluating ({mode}) on {'all' if limit is None else f'the first {limit}'} rows of "
              f"{len(pending)} test set(s)", flush=True)
        args = evaluate_args(spec, settings, mode, pending, run_dir, eval_batch_size)
        peak_json = run_dir / f"eval_{mode}_peak_memory.json"
        log_path = run_dir / f"eval_{mode}.log"
        result = run_measured(measured_command(peak_json, "commonsense_evaluate.py", args), log_path, peak_json,
                              echo=echo, env=slot.env())
        if result["returncode"] != 0:
            raise JobFailed(f"commonsense_evaluate.py exited {result['returncode']}; see {log_path}",
                            result["returncode"])
        record.update(command=["python", "commonsense_evaluate.py", *args], wall_s=result["wall_s"],
                      max_rss_bytes=result["max_rss_bytes"], cuda_peak_bytes=result["cuda_peak_bytes"])
    tasks = {}
    for task in task_names():
        tasks[task] = _finished_task(folder, task, mode)
        if tasks[task] is None:
            raise JobFailed(f"the {mode} evaluation of {task} left no complete result")
    record["tasks"] = tasks
    folder.update(lambda summary: summary["eval"].__setitem__(mode, record))


# ---- the whole grid --------------------------------------------------------------------------------
def build_jobs(folders: dict, modes, data: dict, eval_batch_size: int, echo: bool) -> list:
    """The scheduler's jobs for the grid's runs: trainings, and evaluations after their training."""
    jobs = []
    for spec in grid_jobs([folder.spec for folder in folders.values()], modes):
        folder = folders[spec.run.name]
        info = {"run": spec.run.name, "mode": spec.mode}
        if spec.kind == "train":
            jobs.append(Job(spec.key, "train", lambda slot, f=folder: train_run(f, data, slot, echo),
                            finished=folder.trained, after=spec.after, info=info))
        else:
            jobs.append(Job(spec.key, "eval",
                            lambda slot, f=folder, m=spec.mode: evaluate_run(f, m, eval_batch_size, slot, echo),
                            finished=lambda f=folder, m=spec.mode: f.evaluated(m), after=spec.after, info=info))
    return jobs


def run_grid(specs: list, modes, settings: Settings, out: Path, report_dir: Path, *, eval_batch_size: int,
             command: str, fresh: bool = False, gpus=None, gpus_per_run: int = 1) -> dict:
    """Train and evaluate every run of `specs` into `out`, then write the report; return its paths.

    Raises ReproductionError naming the jobs that failed twice, after everything else ran.
    """
    if fresh:
        remove_previous_outputs(out)
    check_or_record_settings(out, settings)
    machine = machine_info()
    if settings.full and machine["gpu"] is None:
        print("warning: --full on a machine without a GPU: this takes days", file=sys.stderr)
    if settings.base_model == BASE_MODEL:
        print(f"preparing the embedded model ({BASE_MODEL})", flush=True)
        prepare_embedded_model(BASE_MODEL)  # once, so no run's timing includes the conversion
    data = prepare_training_data(out, settings)
    print(f"training data: {data['rows']} rows ({per_task_counts(data['per_task'])})", flush=True)

    folders = {spec.name: RunFolder(out, spec, settings) for spec in specs}
    record = GridRecord(out / RECORD_FILE)
    report_lock = threading.Lock()
    grid = {"modes": list(modes), "gpus": list(gpus or []), "gpus_per_run": gpus_per_run, "record": str(record.path)}

    def write() -> tuple:
        with report_lock:  # matplotlib and the files: one writer at a time
            summaries = [folder.summary() for folder in folders.values()]
            collected = collect(settings, data, summaries, machine, command, grid)
            return write_report(collected, report_dir), collected

    echo = not gpus  # one job at a time: its output as it comes; in parallel only the logs
    jobs = build_jobs(folders, modes, data, eval_batch_size, echo)
    scheduler = Scheduler(jobs, record, gpus, gpus_per_run,
                          on_finish=lambda job: write() if job.kind == "eval" else None,
                          say=lambda line: print(line, flush=True))
    started = time.perf_counter()
    scheduler.run()
    paths, collected = write()
    print(f"\nfinished in {duration(time.perf_counter() - started)}; grid record: {record.path}")
    for mode in modes:
        print(f"\n{mode} (mean ± std over seeds):\n{rank_table(collected['rank_table'][mode], task_columns())}")
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    failures = scheduler.failures()
    blocked = [key for key, state in scheduler.status.items() if state == "blocked"]
    if failures:
        listed = "; ".join(f"{key} ({error})" for key, error in failures)
        raise ReproductionError(f"{len(failures)} job(s) failed twice: {listed}"
                                + (f"; skipped {len(blocked)} evaluation(s) of their runs" if blocked else "")
                                + "; rerun the same command to retry them")
    return paths
