"""The grid's summaries over seeds: the rank table (mean ± std), paired DoRA − LoRA, average vs rank.

Each function takes the runs' summaries (``summary.json`` dicts) and one evaluation mode. Runs
that differ only in their seed form a group; a cell is the mean over the group's seeds with
the sample standard deviation (ddof 1; one seed shows its value alone).
"""
from __future__ import annotations

import io
import math

from commonsense import recipe
from commonsense.reproduce.paper import LLAMA7B_RANK_ROWS, PAPER_SOURCE, TABLE15_AVERAGES
from commonsense.reproduce.plan import ADAPTER_DISPLAY, task_names
from commonsense.reproduce.stats import paired_difference_ci


def mean_std(values) -> tuple:
    """(mean, sample std) of the values; std is None for a single value."""
    values = list(values)
    n = len(values)
    mean = sum(values) / n
    if n == 1:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def mean_std_cell(mean: float, std) -> str:
    """Percent: '60.0 ± 14.1', or '60.0' for one seed."""
    return f"{100 * mean:.1f}" if std is None else f"{100 * mean:.1f} ± {100 * std:.1f}"


def macro_average(record: dict) -> float:
    return sum(record["tasks"][task]["accuracy"] for task in task_names()) / len(task_names())


def _lr_text(lr) -> str:
    return "–" if lr is None else recipe.format_lr(lr)


def seed_groups(runs: list, mode: str) -> list:
    """[(method, r, lr, [runs evaluated in `mode`, by seed])], in the runs' order."""
    groups = {}
    for run in runs:
        if mode in run["eval"]:
            groups.setdefault((run["method"], run["r"], run["learning_rate"]), []).append(run)
    return [(*key, sorted(members, key=lambda run: -1 if run["seed"] is None else run["seed"]))
            for key, members in groups.items()]


def rank_rows(runs: list, mode: str) -> list:
    """The rank table's numbers (fractions), one row per group: per task and the average, mean and std."""
    rows = []
    for method, r, lr, members in seed_groups(runs, mode):
        records = [run["eval"][mode] for run in members]
        tasks = {}
        for task in task_names():
            mean, std = mean_std(record["tasks"][task]["accuracy"] for record in records)
            tasks[task] = {"mean": mean, "std": std}
        averages = [macro_average(record) for record in records]
        mean, std = mean_std(averages)
        rows.append({"method": method, "r": r, "learning_rate": lr, "model_label": members[0]["model_label"],
                     "seeds": [run["seed"] for run in members], "tasks": tasks,
                     "average": {"mean": mean, "std": std, "per_seed": averages}})
    return rows


def rank_table(rows: list, task_columns: list) -> str:
    """Markdown in the seed's layout (Model | r | lr | 8 tasks | Average) plus the number of seeds,
    ours first, then the seed README's LLaMA-7B rank table and the paper's Table 15 where it differs."""
    from commonsense.report import markdown_grid

    header = ["Model", "r", "lr", *task_columns, "Average", "seeds"]
    lines = []
    for row in rows:
        cells = [mean_std_cell(row["tasks"][task]["mean"], row["tasks"][task]["std"]) for task in task_names()]
        lines.append([row["model_label"], "–" if row["r"] is None else row["r"], _lr_text(row["learning_rate"]),
                      *cells, mean_std_cell(row["average"]["mean"], row["average"]["std"]),
                      "–" if row["method"] == "base" else len(row["seeds"])])
    for method, r, lr, values, average in LLAMA7B_RANK_ROWS:
        lines.append([f"LLaMA-7B-{ADAPTER_DISPLAY[method]} (README)", r, lr, *[f"{v:.1f}" for v in values],
                      f"{average:.1f}", "–"])
    for (method, r), (table15, _) in TABLE15_AVERAGES.items():
        lr = next(lr for m, rank, lr, *_ in LLAMA7B_RANK_ROWS if (m, rank) == (method, r))
        lines.append([f"LLaMA-7B-{ADAPTER_DISPLAY[method]} (paper, Table 15)", r, lr, *["–"] * len(task_columns),
                      f"{table15:.1f}", "–"])
    return markdown_grid(header, lines, right_from=1)


def paper_note() -> str:
    differing = "; ".join(f"{ADAPTER_DISPLAY[m]} r{r}: {t15:.1f} in Table 15 vs {readme:.1f} in the README"
                          for (m, r), (t15, readme) in TABLE15_AVERAGES.items())
    return (f"The README rows are the seed README's LLaMA-7B rank table ({PAPER_SOURCE}): one run each, 3 epochs on "
            f"the full mix, full test sets, generation protocol. The paper's Table 15 gives the same sweep with "
            f"other averages for two rows ({differing}); its per-task values are not available here, so those rows "
            "show the average only.")


# ---- paired comparisons -------------------------------------------------------------------------
def paired_rows(runs: list, mode: str) -> list:
    """DoRA − LoRA at each rank both ran, per seed both ran (same examples), with the paired interval,
    and the mean (± std) over those seeds; one block per (LoRA lr, DoRA lr)."""
    groups = seed_groups(runs, mode)
    lora = [(r, lr, members) for method, r, lr, members in groups if method == "lora"]
    dora = [(r, lr, members) for method, r, lr, members in groups if method == "dora"]
    rows = []
    for r, lora_lr, lora_runs in lora:
        for dora_r, dora_lr, dora_runs in dora:
            if dora_r != r:
                continue
            by_seed = {run["seed"]: run for run in dora_runs}
            pairs = []
            for run in lora_runs:
                partner = by_seed.get(run["seed"])
                if partner is None:
                    continue
                a, b = run["eval"][mode]["tasks"], partner["eval"][mode]["tasks"]
                mean, low, high = paired_difference_ci([(a[t]["flags"], b[t]["flags"]) for t in task_names()])
                pairs.append({"seed": run["seed"], "difference": mean, "low": low, "high": high})
            if pairs:
                mean, std = mean_std(pair["difference"] for pair in pairs)
                rows.append({"r": r, "lora_lr": lora_lr, "dora_lr": dora_lr, "seeds": pairs,
                             "mean": mean, "std": std})
    return rows


def paired_table(rows: list) -> str:
    from commonsense.report import markdown_grid

    lines = []
    for row in rows:
        for pair in row["seeds"]:
            lines.append([row["r"], _lr_text(row["lora_lr"]), _lr_text(row["dora_lr"]), pair["seed"],
                          f"{100 * pair['difference']:+.1f}", f"[{100 * pair['low']:+.1f}, {100 * pair['high']:+.1f}]"])
        spread = "" if row["std"] is None else f" ± {100 * row['std']:.1f}"
        lines.append([row["r"], _lr_text(row["lora_lr"]), _lr_text(row["dora_lr"]), f"mean of {len(row['seeds'])}",
                      f"{100 * row['mean']:+.1f}{spread}", "–"])
    return markdown_grid(["r", "LoRA lr", "DoRA lr", "seed", "DoRA − LoRA (points)", "95% CI (paired)"], lines,
                         right_from=0)


# ---- the plot ----------------------------------------------------------------------------------
def plot_lines(rows: list) -> list:
    """[(label, [(r, mean, std)])]: one line per adapter method, or per (method, lr) when a rank ran
    at several lrs; rank-less rows (base, FT) as [(None, mean, std)] for a horizontal line."""
    lines = {}
    by_method = {}
    for row in rows:
        by_method.setdefault(row["method"], []).append(row)
    for method, members in by_method.items():
        ranks = [row["r"] for row in members]
        split = len(set(ranks)) != len(ranks)  # several lrs at one rank: a line per lr
        varied = len({row["learning_rate"] for row in members}) > 1  # e.g. the seed's DoRA r32 at 1e-4
        for row in members:
            name = "base model" if method == "base" else ADAPTER_DISPLAY[method]
            if split or method == "ft":
                name += f" lr {_lr_text(row['learning_rate'])}"
            elif varied:
                name += " (the seed's lr per rank)"
            lines.setdefault(name, []).append((row["r"], row["average"]["mean"], row["average"]["std"] or 0.0))
    return [(name, sorted(points, key=lambda p: p[0] or 0)) for name, points in lines.items()]


def rank_plot_png(rows_by_mode: dict, title: str) -> bytes:
    """Average vs rank (log-2 axis), one panel per mode, error bars = std over seeds."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt

    modes = list(rows_by_mode)
    fig, axes = plt.subplots(1, max(1, len(modes)), figsize=(6 * max(1, len(modes)), 4.5), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        for name, points in plot_lines(rows_by_mode[mode]):
            if points[0][0] is None:  # no rank: a level across the plot
                _, mean, std = points[0]
                ax.axhline(100 * mean, linestyle="--", color="gray" if name == "base model" else None, label=name)
                continue
            ranks, means, stds = zip(*points)
            ax.errorbar(ranks, [100 * m for m in means], yerr=[100 * s for s in stds], marker="o", capsize=4,
                        label=name)
        ax.set_xscale("log", base=2)
        ranked = sorted({row["r"] for row in rows_by_mode[mode] if row["r"] is not None})
        if ranked:
            ax.set_xticks(ranked, [str(r) for r in ranked])
        ax.set_title(f"{title}, {mode}")
        ax.set_xlabel("rank r")
        ax.set_ylabel("macro average accuracy (%)")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    return buffer.getvalue()
