"""What the comparison runs: the runs, the settings that change results, and each run's commands.

Everything here is pure: a :class:`RunSpec` and a :class:`Settings` give the exact
``finetune.py`` and ``commonsense_evaluate.py`` arguments, so the runner only executes them and
the tests check them without running anything.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from commonsense import recipe
from commonsense.embedded_model import SMOLLM2_ALIAS, SMOLLM2_NAME

REPO_ROOT = Path(__file__).resolve().parents[2]

MODEL_NAME = SMOLLM2_NAME  # commonsense_evaluate.py --model: names the evaluation files
BASE_MODEL = SMOLLM2_ALIAS  # the embedded SmolLM2-135M-Instruct
DEFAULT_RUNS = ("base", "lora_r32", "dora_r16", "dora_r32")
MODES = ("generate", "loglik")
SUBSET_LOGGING_STEPS = 1  # a loss point per optimizer step on the short CPU runs
SUBSET_SAVE_STEP = 10  # adapter-only checkpoints are small; they let an interrupted run resume

ADAPTER_DISPLAY = {None: "none", "lora": "LoRA", "dora": "DoRA"}


class ReproductionError(ValueError):
    """Bad options, missing data or a failed step; one-line message."""


def task_names() -> list:
    from commonsense.tasks import TASK_NAMES

    return list(TASK_NAMES)


# ---- runs -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunSpec:
    """One row of the table: the base model, or an adapter kind at a rank with the seed's lr."""

    name: str
    adapter: str | None = None  # None (base model), "lora" or "dora"
    r: int | None = None

    @property
    def alpha(self):
        return None if self.r is None else recipe.lora_alpha(self.r)

    @property
    def learning_rate(self):
        return None if self.adapter is None else recipe.LEARNING_RATE[self.adapter]

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

    def trained_rows(self, data_rows: int) -> int:
        """Rows the trainer sees: the data less the seed's validation split with --full."""
        return data_rows - (recipe.VAL_SET_SIZE if self.full else 0)


# ---- commands ---------------------------------------------------------------------------------
def finetune_args(spec: RunSpec, settings: Settings, data_path, adapter_dir, total_steps: int) -> list:
    """finetune.py's arguments for one adapter run: the seed's flags, scaled where the run is shorter."""
    if settings.full:
        val_set_size, save_step = recipe.VAL_SET_SIZE, recipe.EVAL_STEP
        warmup, logging = recipe.WARMUP_STEPS, recipe.LOGGING_STEPS
    else:
        val_set_size, save_step, logging = 0, SUBSET_SAVE_STEP, SUBSET_LOGGING_STEPS
        warmup = recipe.scaled_warmup_steps(total_steps)
    return [
        "--base_model", settings.base_model,
        "--data_path", str(data_path),
        "--output_dir", str(adapter_dir),
        "--adapter_name", spec.adapter,
        "--lora_r", str(spec.r),
        "--lora_alpha", str(spec.alpha),
        "--lora_dropout", str(recipe.LORA_DROPOUT),
        "--target_modules", json.dumps(recipe.TARGET_MODULES),
        "--learning_rate", recipe.format_lr(spec.learning_rate),
        "--batch_size", str(recipe.BATCH_SIZE),
        "--micro_batch_size", str(settings.micro_batch_size),
        "--num_epochs", f"{settings.num_epochs:g}",
        "--cutoff_len", str(recipe.CUTOFF_LEN),
        "--val_set_size", str(val_set_size),
        "--eval_step", str(recipe.EVAL_STEP),
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
