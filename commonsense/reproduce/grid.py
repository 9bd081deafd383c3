"""The grid: methods x ranks x lrs x seeds as runs, the runs as jobs, and the plan a dry run prints.

Pure, like ``plan``: nothing here trains, evaluates or loads a model. The estimate's timings
come from :mod:`~commonsense.reproduce.estimate`; this module only multiplies them out.
"""
from __future__ import annotations

from dataclasses import dataclass

from commonsense import recipe
from commonsense.reproduce.plan import ADAPTER_METHODS, DEFAULT_SEED, METHODS, ReproductionError, Settings, run_spec

# The seed README's LLaMA-7B rank table.
DEFAULT_RANKS = (4, 8, 16, 32, 64)


# ---- the runs ----------------------------------------------------------------------------------
def _check_unique(name: str, values) -> None:
    seen = set()
    for value in values:
        if value in seen:
            raise ReproductionError(f"--{name} lists {value:g} twice" if isinstance(value, float)
                                    else f"--{name} lists {value} twice")
        seen.add(value)


def check_seeds(seeds) -> None:
    if not seeds:
        raise ReproductionError("--seeds is empty; e.g. --seeds 0 1 2")
    for seed in seeds:
        if seed < 0:
            raise ReproductionError(f"--seeds must be non-negative integers, got {seed}")
    _check_unique("seeds", seeds)


def grid_runs(methods, ranks=DEFAULT_RANKS, seeds=(DEFAULT_SEED,), lrs=None) -> list:
    """The runs of a grid, in the order the methods are given (base: once, no seed).

    Each adapter method runs at every rank, lr and seed; FT (no rank) at every lr and seed;
    without ``lrs`` each run takes the seed's lr for its method and rank.
    """
    methods, ranks, seeds = list(methods), list(ranks), list(seeds)
    if not methods:
        raise ReproductionError("--methods is empty; e.g. --methods lora dora")
    for method in methods:
        if method not in METHODS:
            raise ReproductionError(f"unknown method {method!r} in --methods; use {', '.join(METHODS)}")
    _check_unique("methods", methods)
    for r in ranks:
        if r <= 0:
            raise ReproductionError(f"--ranks must be positive integers, got {r}")
    _check_unique("ranks", ranks)
    check_seeds(seeds)
    if lrs is not None:
        for lr in lrs:
            if not lr > 0:
                raise ReproductionError(f"--lrs must be positive, got {lr:g}")
        _check_unique("lrs", [recipe.format_lr(lr) for lr in lrs])
    if any(m in ADAPTER_METHODS for m in methods) and not ranks:
        raise ReproductionError("--ranks is empty; e.g. --ranks 4 8 16 32 64")

    runs = []
    for method in methods:
        if method == "base":
            runs.append(run_spec("base"))
            continue
        for r in ranks if method in ADAPTER_METHODS else [None]:
            for lr in lrs if lrs is not None else [None]:
                runs += [run_spec(method, r, lr, seed) for seed in seeds]
    return runs


# ---- the jobs ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class JobSpec:
    """One unit of work for a slot: a run's training, or its evaluation in one mode."""

    kind: str  # "train" or "eval"
    run: RunSpec
    mode: str | None = None

    @property
    def key(self) -> str:
        return f"train {self.run.name}" if self.kind == "train" else f"eval {self.mode} {self.run.name}"

    @property
    def after(self) -> tuple:
        """The jobs this one waits for: an evaluation, its run's training."""
        return (f"train {self.run.name}",) if self.kind == "eval" and self.run.adapter else ()


def grid_jobs(runs: list, modes) -> list:
    """Every training, then every evaluation (each after its training), in the runs' order."""
    trains = [JobSpec("train", run) for run in runs if run.adapter]
    evals = [JobSpec("eval", run, mode) for run in runs for mode in modes]
    return trains + evals


# ---- the plan ----------------------------------------------------------------------------------
def eval_examples(settings: Settings, mode: str, test_rows: dict) -> int:
    """Examples one evaluation scores: per test set its first `limit` rows (all with --full)."""
    limit = settings.eval_limit(mode)
    return sum(n if limit is None else min(n, limit) for n in test_rows.values())


def estimate_seconds(runs, modes, steps: int, eval_counts: dict, timing: dict, slots: int, gpus_per_run: int) -> dict:
    """Wall time: the trainings' steps x step time (ideal DDP speed-up over a run's GPUs) over the
    parallel training slots, plus every evaluation's examples x per-example time over the GPUs."""
    trained = sum(1 for run in runs if run.adapter)
    train = trained * steps * timing["step_s"] / gpus_per_run / slots
    evaluate = sum(len(runs) * eval_counts[mode] * timing[f"{mode}_example_s"] for mode in modes) / (slots * gpus_per_run)
    return {"train_s": train, "eval_s": evaluate, "total_s": train + evaluate}


def hours(seconds: float) -> str:
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h" if seconds < 48 * 3600 else f"{seconds / 86400:.1f} days"


def plan_text(runs: list, modes, settings: Settings, data_rows: int, test_rows: dict, *, gpus=None,
              gpus_per_run: int = 1, timing: dict = None) -> str:
    """The dry run's page: each run and evaluation, steps and examples, totals, and the estimate."""
    steps = settings.total_steps(data_rows)
    eval_counts = {mode: eval_examples(settings, mode, test_rows) for mode in modes}
    trained = [run for run in runs if run.adapter]
    slots = len(gpus) // gpus_per_run if gpus else 1
    where = (f"GPUs {','.join(map(str, gpus))}: {slots} training slot(s) of {gpus_per_run} GPU(s), "
             f"one evaluation per GPU" if gpus else "no --gpus: one job at a time")
    lines = [
        f"Plan: {len(runs)} run(s), {len(trained)} to train, {len(runs) * len(modes)} evaluation(s) "
        f"({', '.join(modes)}); {where}.",
        f"Base model {settings.base_model}; {settings.trained_rows(data_rows):,} training rows x "
        f"{settings.num_epochs:g} epoch(s) = {steps:,} optimizer steps per run (global batch {recipe.BATCH_SIZE}); "
        + ", ".join(f"{eval_counts[m]:,} examples per {m} evaluation" for m in modes) + ".",
        "",
        f"{'run':<28} {'method':<6} {'r':>4} {'lr':>7} {'seed':>5} {'steps':>8}  evaluations",
    ]
    for run in runs:
        lines.append(f"{run.name:<28} {run.method:<6} {run.r if run.r is not None else '-':>4} "
                     f"{recipe.format_lr(run.learning_rate) if run.learning_rate else '-':>7} "
                     f"{run.seed if run.seed is not None else '-':>5} {steps if run.adapter else 0:>8,}  "
                     + ", ".join(f"{m} ({eval_counts[m]:,})" for m in modes))
    total_examples = sum(len(runs) * eval_counts[m] for m in modes)
    lines += ["", f"Totals: {len(trained) * steps:,} optimizer steps, {total_examples:,} evaluated examples."]
    if any(run.method == "ft" for run in runs):
        lines.append("FT has no rank: one run per lr and seed.")
    if timing is None:
        lines.append("Estimated time: not measured (--no_measure).")
        return "\n".join(lines) + "\n"
    estimate = estimate_seconds(runs, modes, steps, eval_counts, timing, slots, gpus_per_run)
    lines += [
        f"Estimated time (an estimate, from a short measurement on {timing['device']}): "
        f"{hours(estimate['total_s'])} = training {hours(estimate['train_s'])} + evaluation {hours(estimate['eval_s'])}.",
        f"  measured: {timing['step_s']:.2f} s per optimizer step (DoRA r{timing['rank']}, {recipe.BATCH_SIZE} rows "
        f"in micro batches padded to {timing['length']} tokens, the data's mean; cutoff {recipe.CUTOFF_LEN}); "
        + ", ".join(f"{timing[f'{m}_example_s']:.3f} s per {m} example" for m in modes) + ".",
        "  It assumes every run trains as fast as that DoRA step (LoRA is faster, FT slower), ideal DDP speed-up, "
        "a machine as busy as during the measurement, and no time lost between jobs.",
    ]
    return "\n".join(lines) + "\n"
