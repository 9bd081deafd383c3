"""Run the plan: each run trained (finetune.py) and evaluated (commonsense_evaluate.py) as a child process.

A run's state lives in its folder, ``OUTPUT_DIR/<run>/summary.json``: a step already recorded
there is skipped, so a rerun of the same command resumes (an interrupted finetune.py from its
last checkpoint, an interrupted evaluation from its per-example log). The report is rewritten
after every run, so a long comparison shows its results so far.
"""
from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path

from commonsense import recipe
from commonsense.embedded_model import prepare_embedded_model
from commonsense.io import atomic_write_json
from commonsense.machine import machine_info
from commonsense.reproduce.measured import measured_command, run_measured
from commonsense.reproduce.plan import (
    BASE_MODEL,
    MODEL_NAME,
    MODES,
    ReproductionError,
    RunSpec,
    Settings,
    evaluate_args,
    finetune_args,
    task_names,
)
from commonsense.reproduce.report import collect, duration, per_task_counts, results_table, write_report
from commonsense.reproduce.training_data import prepare_training_data

CONFIG_FILE = "reproduction_config.json"  # marks a folder as this package's output (see --fresh)


# ---- the output folder -------------------------------------------------------------------------
def check_or_record_settings(out: Path, settings: Settings) -> None:
    """Refuse to mix results of different settings in one folder; record them the first time."""
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


# ---- one run ------------------------------------------------------------------------------------
def load_summary(run_dir: Path, spec: RunSpec) -> dict:
    path = run_dir / "summary.json"
    if path.exists():
        return json.loads(path.read_text(encoding="utf-8"))
    return {"run": spec.name, "adapter": spec.adapter, "r": spec.r, "alpha": spec.alpha,
            "learning_rate": spec.learning_rate, "model_label": spec.model_label, "eval": {}}


def save_summary(run_dir: Path, summary: dict) -> None:
    atomic_write_json(run_dir / "summary.json", summary, indent=2)


def train_run(spec: RunSpec, settings: Settings, data: dict, run_dir: Path, summary: dict) -> None:
    """Fine-tune one adapter with finetune.py (skipped when already done); record the costs."""
    if "train" in summary:
        print(f"[{spec.name}] training already done ({summary['train']['global_step']} steps); skipping", flush=True)
        return
    adapter_dir = run_dir / "adapter"
    rows = settings.trained_rows(data["rows"])
    total_steps = recipe.training_steps(rows, recipe.BATCH_SIZE, settings.micro_batch_size, settings.num_epochs)
    args = finetune_args(spec, settings, data["path"], adapter_dir, total_steps)
    resumed = any(adapter_dir.glob("checkpoint-*"))
    print(f"[{spec.name}] fine-tuning: {total_steps} steps on {rows} rows"
          + (" (resuming from the last checkpoint)" if resumed else ""), flush=True)
    peak_json = run_dir / "train_peak_memory.json"
    log_path = run_dir / "train.log"
    result = run_measured(measured_command(peak_json, "finetune.py", args), log_path, peak_json)
    if result["returncode"] != 0:
        raise ReproductionError(f"finetune.py failed for {spec.name} (exit {result['returncode']}); see {log_path}; "
                                "rerun the same command to resume")
    train_log = json.loads((adapter_dir / "train_log.json").read_text(encoding="utf-8"))
    summary["train"] = {
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
        "resumed": resumed,
    }
    save_summary(run_dir, summary)
    for checkpoint in adapter_dir.glob("checkpoint-*"):  # the final adapter is saved; free the disk
        shutil.rmtree(checkpoint, ignore_errors=True)


def _task_files(spec: RunSpec, run_dir: Path, task: str, mode: str) -> tuple:
    from commonsense.evaluation import RunInfo, result_path, summary_path

    result = result_path(run_dir / "eval", RunInfo(model_name=MODEL_NAME, adapter=spec.display_adapter), task, mode)
    return result, summary_path(result)


def _finished_task(spec: RunSpec, settings: Settings, run_dir: Path, task: str, mode: str):
    """The task's evaluation record if it is finished with the wanted settings, else None."""
    result_file, summary_file = _task_files(spec, run_dir, task, mode)
    if not (result_file.exists() and summary_file.exists()):
        return None
    task_summary = json.loads(summary_file.read_text(encoding="utf-8"))
    if task_summary.get("mode") != mode or task_summary.get("limit") != settings.eval_limit(mode):
        return None
    flags = "".join("1" if row["flag"] else "0" for row in json.loads(result_file.read_text(encoding="utf-8")))
    if len(flags) != task_summary["n"]:
        return None
    return {"correct": task_summary["correct"], "n": task_summary["n"], "accuracy": task_summary["accuracy"],
            "flags": flags}


def evaluate_run(spec: RunSpec, settings: Settings, run_dir: Path, summary: dict, mode: str,
                 eval_batch_size: int) -> None:
    """Evaluate one run in one mode with commonsense_evaluate.py (only the tasks not yet done)."""
    if mode in summary["eval"]:
        print(f"[{spec.name}] {mode} evaluation already done; skipping", flush=True)
        return
    pending = [task for task in task_names() if _finished_task(spec, settings, run_dir, task, mode) is None]
    record = {"wall_s": 0.0, "max_rss_bytes": None, "cuda_peak_bytes": None, "resumed": len(pending) < len(task_names())}
    if pending:
        limit = settings.eval_limit(mode)
        print(f"[{spec.name}] evaluating ({mode}) on {'all' if limit is None else f'the first {limit}'} rows of "
              f"{len(pending)} test set(s)", flush=True)
        args = evaluate_args(spec, settings, mode, pending, run_dir, eval_batch_size)
        peak_json = run_dir / f"eval_{mode}_peak_memory.json"
        log_path = run_dir / f"eval_{mode}.log"
        result = run_measured(measured_command(peak_json, "commonsense_evaluate.py", args), log_path, peak_json)
        if result["returncode"] != 0:
            raise ReproductionError(f"commonsense_evaluate.py failed for {spec.name} ({mode}, exit "
                                    f"{result['returncode']}); see {log_path}; rerun the same command to resume")
        record.update(command=["python", "commonsense_evaluate.py", *args], wall_s=result["wall_s"],
                      max_rss_bytes=result["max_rss_bytes"], cuda_peak_bytes=result["cuda_peak_bytes"])
    tasks = {}
    for task in task_names():
        tasks[task] = _finished_task(spec, settings, run_dir, task, mode)
        if tasks[task] is None:
            raise ReproductionError(f"{spec.name}: the {mode} evaluation of {task} left no complete result")
    record["tasks"] = tasks
    summary["eval"][mode] = record
    save_summary(run_dir, summary)


# ---- the whole comparison ------------------------------------------------------------------------
def run_comparison(specs: list, settings: Settings, out: Path, report_dir: Path, *, eval_batch_size: int,
                   command: str, fresh: bool = False) -> dict:
    """Train and evaluate every run of `specs` into `out`, then write the report; return its paths."""
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

    started = time.perf_counter()
    summaries = []
    for spec in specs:
        run_dir = out / spec.name
        run_dir.mkdir(parents=True, exist_ok=True)
        summary = load_summary(run_dir, spec)
        if spec.adapter is not None:
            train_run(spec, settings, data, run_dir, summary)
        for mode in MODES:
            evaluate_run(spec, settings, run_dir, summary, mode, eval_batch_size)
        summaries.append(summary)
        # After every run, so a long comparison shows its results so far.
        paths = write_report(collect(settings, data, summaries, machine, command), report_dir)
    print(f"\nfinished in {duration(time.perf_counter() - started)}")
    for mode in MODES:
        print(f"\n{mode}:\n{results_table(summaries, mode)}")
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return paths
