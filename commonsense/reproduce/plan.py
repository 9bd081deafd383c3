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

BASE_MODEL = SMOLLM2_ALIAS  # the embedded SmolLM2-135M-Instruct
# The recorded comparison (experiment/reproduction.md): DoRA r32 at 2e-4 as the seed's llama_7B_Dora.sh.
DEFAULT_RUNS = ("base", "lora_r32", "dora_r16", "dora_r32_lr2e-4")
DEFAULT_SEED = 42  # finetune.py's default, the recorded comparison's
MODES = ("generate", "loglik")
METHODS = ("lora", "dora", "ft", "base")
ADAPTER_METHODS = ("lora", "dora")  # the methods with a rank
SUBSET_LOGGING_STEPS = 1  # a loss point per optimizer step on the short CPU runs
SUBSET_SAVE_STEP = 10  # adapter-only checkpoints are small; they let an interrupted run resume

# commonsense_evaluate.py --adapter per method.
ADAPTER_DISPLAY = {"base": "none", "lora": "LoRA", "dora": "DoRA", "ft": "FT"}
# commonsense_evaluate.py --model (it only names the result files) by a pattern of --base_model.
_MODEL_PATTERNS = (("LLaMA3-8B", r"llama-?3-8b"), ("LLaMA2-7B", r"llama-?2-7b"), ("LLaMA-13B", r"llama-13b"),
                   ("LLaMA-7B", r"llama-7b"), (SMOLLM2_NAME, r"smollm2-135m"))


class ReproductionError(ValueError):
    """Bad options, missing data or a failed step; one-line message."""


def task_names() -> list:
    from commonsense.tasks import TASK_NAMES

    return list(TASK_NAMES)


def model_name(base_model: str) -> str:
    """The evaluation's --model for a base model: a LLaMA size or SmolLM2-135M (the default)."""
    text = str(base_model).lower()
    for name, pattern in _MODEL_PATTERNS:
        if re.search(pattern, text):
            return name
    return SMOLLM2_NAME


def model_label(base_model: str) -> str:
    """The name the report gives the base model: a known model's, else the folder or hub id's last part."""
    text = str(base_model).lower()
    if any(re.search(pattern, text) for _, pattern in _MODEL_PATTERNS):
        return model_name(base_model)
    return Path(str(base_model).rstrip("/")).name or str(base_model)


# ---- runs -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunSpec:
    """One trained (or, for the base model, evaluated) model: a method, its rank, lr and run seed.

    The run seed is finetune.py's --seed (adapter initialisation and data order); the training
    data itself is fixed by the settings' data seed, so seeds measure training variance only.
    """

    method: str  # "base", "lora", "dora" or "ft"
    r: int | None = None  # lora and dora only
    learning_rate: float | None = None  # None for base
    seed: int | None = None  # None for base (evaluated once)

    @property
    def name(self) -> str:
        """base, ft_lr2e-5_s0, dora_r16_lr2e-4_s0: the run's folder."""
        if self.method == "base":
            return "base"
        rank = f"_r{self.r}" if self.r is not None else ""
        return f"{self.method}{rank}_lr{recipe.format_lr(self.learning_rate)}_s{self.seed}"

    @property
    def adapter(self) -> str | None:
        """finetune.py --adapter_name (None: nothing is trained)."""
        return None if self.method == "base" else self.method

    @property
    def alpha(self):
        return None if self.r is None else recipe.lora_alpha(self.r)

    @property
    def display_adapter(self) -> str:
        return ADAPTER_DISPLAY[self.method]

    def label(self, base_model: str) -> str:
        model = model_label(base_model)
        return f"{model} (base)" if self.method == "base" else f"{model}-{self.display_adapter}"


def run_spec(method: str, r=None, learning_rate=None, seed=None) -> RunSpec:
    """A run with the seed's lr for its method and rank unless one is given."""
    if method == "base":
        return RunSpec("base")
    if learning_rate is None:
        learning_rate = recipe.default_learning_rate(method, r)
    return RunSpec(method, r if method in ADAPTER_METHODS else None, float(learning_rate), int(seed))


_LR = r"[0-9]+(?:\.[0-9]+)?(?:e-?[0-9]+)?"
_RUN_NAME = re.compile(rf"^(?:(lora|dora)_r([1-9][0-9]*)|(ft))(?:_lr({_LR}))?$")


def parse_runs(text: str, seeds=(DEFAULT_SEED,)) -> list:
    """'base,lora_r32,dora_r32_lr2e-4,ft' -> RunSpecs for each seed, in the given order.

    A name without _lr takes the seed's lr for its method and rank (recipe.default_learning_rate).
    """
    names = [part.strip() for part in str(text).split(",") if part.strip()]
    if not names:
        raise ReproductionError("--runs is empty; e.g. --runs base,lora_r32,dora_r16,dora_r32")
    if len(set(names)) != len(names):
        raise ReproductionError(f"--runs names a run twice: {text}")
    specs = []
    for name in names:
        if name == "base":
            specs.append(run_spec("base"))
            continue
        match = _RUN_NAME.match(name)
        if match is None:
            raise ReproductionError(f"unknown run {name!r} in --runs; use base, ft, lora_rN or dora_rN, optionally "
                                    "with _lrX (e.g. dora_r16, dora_r32_lr2e-4, ft_lr2e-5)")
        method = match.group(1) or match.group(3)
        r = int(match.group(2)) if match.group(2) else None
        lr = float(match.group(4)) if match.group(4) else None
        if lr is not None and not lr > 0:
            raise ReproductionError(f"run {name!r}: the learning rate must be positive")
        specs += [run_spec(method, r, lr, seed) for seed in seeds]
    if len({spec.name for spec in specs}) != len(specs):
        raise ReproductionError(f"--runs names a run twice: {text}")
    return specs


# ---- settings ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Settings:
    """What every run of a folder shares and what changes its results; a rerun must match it.

    The grid's axes (methods, ranks, lrs, seeds) are not here: a folder's grid may grow.
    """

    base_model: str
    source_dir: str
    full: bool
    train_rows: int | None  # None with --full: the whole mix
    num_epochs: float
    eval_limit_generate: int | None  # None with --full: the whole test set
    eval_limit_loglik: int | None
    data_seed: int  # the mix's shuffle and the CPU subset's sample
    micro_batch_size: int

    def eval_limit(self, mode: str):
        return self.eval_limit_generate if mode == "generate" else self.eval_limit_loglik

    def trained_rows(self, data_rows: int) -> int:
        """Rows the trainer sees: the data less the seed's validation split with --full."""
        return data_rows - (recipe.VAL_SET_SIZE if self.full else 0)

    def total_steps(self, data_rows: int) -> int:
        return recipe.training_steps(self.trained_rows(data_rows), recipe.BATCH_SIZE, self.micro_batch_size,
                                     self.num_epochs)


# ---- commands ---------------------------------------------------------------------------------
def micro_batch_per_process(micro_batch_size: int, processes: int) -> int:
    """The largest micro batch <= the wanted one whose accumulation splits evenly over the processes
    (finetune.py keeps the global batch; scripts/common.sh micro_batch_for does the same)."""
    for micro in range(micro_batch_size, 0, -1):
        if recipe.BATCH_SIZE % (micro * processes) == 0:
            return micro
    raise ReproductionError(f"the global batch {recipe.BATCH_SIZE} cannot be split over {processes} processes")


def finetune_args(spec: RunSpec, settings: Settings, data_path, adapter_dir, total_steps: int,
                  processes: int = 1) -> list:
    """finetune.py's arguments for one run: the seed's flags, scaled where the run is shorter."""
    if settings.full:
        val_set_size, save_step = recipe.VAL_SET_SIZE, recipe.EVAL_STEP
        warmup, logging = recipe.WARMUP_STEPS, recipe.LOGGING_STEPS
    else:
        val_set_size, save_step, logging = 0, SUBSET_SAVE_STEP, SUBSET_LOGGING_STEPS
        warmup = recipe.scaled_warmup_steps(total_steps)
    args = [
        "--base_model", settings.base_model,
        "--data_path", str(data_path),
        "--output_dir", str(adapter_dir),
        "--adapter_name", spec.adapter,
    ]
    if spec.method in ADAPTER_METHODS:  # FT trains every decoder linear layer, the paper's baseline
        args += ["--lora_r", str(spec.r), "--lora_alpha", str(spec.alpha),
                 "--lora_dropout", str(recipe.LORA_DROPOUT), "--target_modules", json.dumps(recipe.TARGET_MODULES)]
    args += [
        "--learning_rate", recipe.format_lr(spec.learning_rate),
        "--batch_size", str(recipe.BATCH_SIZE),
        "--micro_batch_size", str(micro_batch_per_process(settings.micro_batch_size, processes)),
        "--num_epochs", f"{settings.num_epochs:g}",
        "--cutoff_len", str(recipe.CUTOFF_LEN),
        "--val_set_size", str(val_set_size),
        "--eval_step", str(recipe.EVAL_STEP),
        "--save_step", str(save_step),
        "--warmup_steps", str(warmup),
        "--logging_steps", str(logging),
        "--seed", str(spec.seed),
        "--resume_from_checkpoint", "auto",
    ]
    if settings.full:  # as the seed's scripts: LLaMA-7B at micro batch 16 fits no other way
        args.append("--use_gradient_checkpointing")
    return args


def evaluate_args(spec: RunSpec, settings: Settings, mode: str, tasks: list, run_dir: Path,
                  eval_batch_size: int) -> list:
    """commonsense_evaluate.py's arguments for one run and mode."""
    # A fully fine-tuned model is itself the base model to evaluate.
    base = str(run_dir / "adapter") if spec.method == "ft" else settings.base_model
    args = ["--model", model_name(settings.base_model), "--adapter", spec.display_adapter,
            "--dataset", ",".join(tasks), "--base_model", base]
    if spec.method in ADAPTER_METHODS:
        args += ["--lora_weights", str(run_dir / "adapter")]
    if mode == "generate" and not settings.full:  # CPU scale: beams stop at EOS (the recorded runs did);
        args += ["--eos_stop"]  # --full decodes as the seed, always 32 new tokens
    args += ["--batch_size", str(eval_batch_size), "--mode", mode,
             "--output_dir", str(run_dir / "eval"), "--task_log_dir", str(run_dir / "eval" / f"logs-{mode}")]
    limit = settings.eval_limit(mode)
    if limit is not None:
        args += ["--limit", str(limit)]
    return args
