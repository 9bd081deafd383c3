"""Collect per-task evaluation summaries into a results table, a CSV and a bar chart.

Reads every ``*.summary.json`` that :mod:`commonsense.evaluation` wrote in the
experiment folder, groups them into runs (model, adapter, mode) and writes

* ``results.md``: Model | Adapter | Mode | n | BoolQ ... OBQA | Average, accuracies
  in percent with one decimal, "–" for a task not evaluated, the Average taken
  over the tasks present and marked with "*" when some are missing; n is the
  number of examples evaluated over all present tasks;
* ``results.csv``: the runs' numbers at full precision, one row per run (empty cell = missing);
* ``results.png``: grouped bars, one group per task (plus Average), one bar per run.

The table and the chart also show each task's chance level: the accuracy expected from
picking one of each example's answer options uniformly at random, averaged over the
evaluated examples. An example's options are :func:`commonsense.tasks.answer_options`: the
task's fixed choices, or for ARC (3 to 5 answers) those its prompt lists. The examples are read from each summary's
results file, or else taken as the first n rows of the shipped ``dataset/<task>/test.json``.

All three are written atomically. CLI (from the repository root):

    python -m commonsense.report [--experiment_dir experiment] [--out_dir experiment]
"""
import csv
import io
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from commonsense.cli import OneLineErrorParser, run_or_exit
from commonsense.io import atomic_write_bytes, atomic_write_text
from commonsense.tasks import TASKS, answer_options

SHIPPED_DATASET_DIR = Path(__file__).resolve().parent.parent / "dataset"
CHANCE_LABEL = ("Chance", "uniform guess")
MISSING = "–"  # en dash, as in the paper's tables
INCOMPLETE_MARK = "*"
SUMMARY_SUFFIX = ".summary.json"
REQUIRED_FIELDS = ("model", "adapter", "dataset", "accuracy", "n")


class ReportError(ValueError):
    """Nothing to report, or an unusable folder; one-line message."""


@dataclass
class Run:
    """All task summaries of one (model, adapter, mode) combination."""

    model: str
    adapter: str
    mode: str
    by_task: dict = field(default_factory=dict)  # task name -> summary dict

    @property
    def label(self) -> str:
        return f"{self.model} {self.adapter}" + ("" if self.mode == "generate" else f" ({self.mode})")

    def accuracy(self, task_name: str):
        summary = self.by_task.get(task_name)
        return None if summary is None else float(summary["accuracy"])

    @property
    def n(self) -> int:
        return sum(int(s["n"]) for s in self.by_task.values())

    @property
    def complete(self) -> bool:
        return all(name in self.by_task for name in TASKS)

    @property
    def average(self):
        present = [self.accuracy(name) for name in TASKS if name in self.by_task]
        return sum(present) / len(present) if present else None


# --------------------------------------------------------------------------- collecting

def load_summaries(experiment_dir) -> list:
    """Valid summary dicts in `experiment_dir`; unreadable or foreign files are skipped with a warning."""
    folder = Path(experiment_dir)
    if not folder.is_dir():
        raise ReportError(f"experiment folder not found: {folder}")
    summaries = []
    for path in sorted(folder.glob(f"*{SUMMARY_SUFFIX}")):
        try:
            summary = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            print(f"warning: skipping {path}: {err}", file=sys.stderr)
            continue
        if not isinstance(summary, dict) or any(k not in summary for k in REQUIRED_FIELDS):
            print(f"warning: skipping {path}: not an evaluation summary", file=sys.stderr)
            continue
        if summary["dataset"] not in TASKS:
            print(f"warning: skipping {path}: unknown dataset {summary['dataset']!r}", file=sys.stderr)
            continue
        summaries.append(summary)
    return summaries


def collect_runs(summaries) -> list:
    """Group summaries into runs, in order of first appearance; a later-finished duplicate wins."""
    runs = {}
    for summary in summaries:
        key = (str(summary["model"]), str(summary["adapter"]), str(summary.get("mode", "generate")))
        run = runs.setdefault(key, Run(*key))
        previous = run.by_task.get(summary["dataset"])
        # ISO timestamps compare correctly as strings.
        if previous is None or str(summary.get("finished_at", "")) >= str(previous.get("finished_at", "")):
            run.by_task[summary["dataset"]] = summary
    return list(runs.values())


# --------------------------------------------------------------------------- chance level

def chance_accuracy(rows, task_name: str):
    """Expected accuracy of a uniform guess among each row's options; None if a row has none."""
    try:
        counts = [len(answer_options(task_name, str(row.get("instruction", "")))) for row in rows]
    except ValueError:
        return None
    return sum(1 / k for k in counts) / len(counts) if counts else None


def _read_rows(path: Path, n: int):
    """The first n rows of a JSON list file, or None when it cannot give n rows."""
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(rows, list) or len(rows) < n or not all(isinstance(r, dict) for r in rows[:n]):
        return None
    return rows[:n]


def evaluated_rows(experiment_dir, summary: dict, dataset_dir=SHIPPED_DATASET_DIR):
    """The examples a summary scored: its results file, else the first n rows of the test set."""
    n = int(summary["n"])
    name = summary.get("output_file")
    if isinstance(name, str) and name and Path(name).name == name:  # a plain name in the folder
        rows = _read_rows(Path(experiment_dir) / name, n)
        if rows is not None and len(rows) == n:
            return rows
    return _read_rows(Path(dataset_dir) / summary["dataset"] / "test.json", n)


def chance_levels(runs, experiment_dir, dataset_dir=SHIPPED_DATASET_DIR) -> dict:
    """{task name: (chance accuracy, n)} over the largest evaluated set of each task.

    Runs of one folder normally evaluate the same rows; where they differ, the chance
    shown is that of the run with the most examples. A task whose examples cannot be
    read, or whose options cannot be found (tasks.answer_options), has no entry.
    """
    levels = {}
    for name in TASKS:
        summaries = [run.by_task[name] for run in runs if name in run.by_task]
        if not summaries:
            continue
        largest = max(summaries, key=lambda s: int(s["n"]))
        rows = evaluated_rows(experiment_dir, largest, dataset_dir)
        chance = chance_accuracy(rows, name) if rows is not None else None
        if chance is not None:
            levels[name] = (chance, len(rows))
    return levels


def chance_average(levels: dict):
    """The macro average of the chance levels, as the runs' Average (None without any)."""
    return sum(c for c, _ in levels.values()) / len(levels) if levels else None


# --------------------------------------------------------------------------- rendering

def percent_cell(value) -> str:
    """An accuracy in [0, 1] as a table cell: percent with one decimal, or the en dash."""
    return MISSING if value is None else f"{100 * value:.1f}"


def markdown_grid(header: list, rows: list, right_from: int) -> str:
    """A Markdown table; columns from ``right_from`` on are right-aligned (numbers)."""
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---" if i < right_from else "---:" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def markdown_table(runs, chance=None) -> str:
    """The results table (with a footnote if any average is over a subset of tasks).

    ``chance`` (from :func:`chance_levels`) adds a last row with each task's chance level.
    """
    headers = ["Model", "Adapter", "Mode", "n"] + [t.display_name for t in TASKS.values()] + ["Average"]
    rows = []
    for run in runs:
        average = percent_cell(run.average) + ("" if run.complete else INCOMPLETE_MARK)
        rows.append([run.model, run.adapter, run.mode, str(run.n)]
                    + [percent_cell(run.accuracy(name)) for name in TASKS] + [average])
    chance_complete = not chance or all(name in chance for name in TASKS)
    if chance:
        cells = [percent_cell(chance[name][0]) if name in chance else MISSING for name in TASKS]
        average = percent_cell(chance_average(chance)) + ("" if chance_complete else INCOMPLETE_MARK)
        rows.append(list(CHANCE_LABEL) + [MISSING, str(sum(n for _, n in chance.values()))] + cells + [average])
    text = markdown_grid(headers, rows, right_from=3)
    if not (chance_complete and all(run.complete for run in runs)):
        # Escaped: a line starting with "* " would render as a bullet.
        text += f"\n\\{INCOMPLETE_MARK} average over the evaluated tasks only ({MISSING} = not evaluated).\n"
    if chance:
        text += ("\nChance: the accuracy expected from picking one of each example's answer options "
                 "uniformly at random (the task's choices; for ARC, the answers its prompt lists), over the evaluated examples.\n")
    return text


def csv_text(runs) -> str:
    """One row per run: accuracies in percent at full precision; an empty cell is a missing task."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["model", "adapter", "mode", "n"] + [t.display_name for t in TASKS.values()]
                    + ["average", "tasks", "complete"])
    for run in runs:
        accuracies = [run.accuracy(name) for name in TASKS]
        writer.writerow([run.model, run.adapter, run.mode, run.n]
                        + ["" if a is None else round(100 * a, 4) for a in accuracies]
                        + [round(100 * run.average, 4), len(run.by_task), run.complete])
    return buffer.getvalue()


def chart_png(runs, chance=None) -> bytes:
    """Grouped bar chart (PNG bytes): task groups on x, one bar per run, accuracy in percent.

    ``chance`` (from :func:`chance_levels`) draws each task's chance level as a dashed line across its group.
    """
    import matplotlib

    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt

    groups = [t.display_name for t in TASKS.values()] + ["Average"]
    width = 0.8 / len(runs)
    fig, ax = plt.subplots(figsize=(max(8, 1.1 * len(groups) * max(1, len(runs) / 2)), 4.5))
    for k, run in enumerate(runs):
        values = [run.accuracy(name) for name in TASKS] + [run.average]
        xs = [g + (k - (len(runs) - 1) / 2) * width for g in range(len(groups))]
        # Missing tasks get no bar (NaN) rather than a misleading zero.
        heights = [float("nan") if v is None else 100 * v for v in values]
        label = run.label + ("" if run.complete else f" ({INCOMPLETE_MARK}partial)")
        ax.bar(xs, heights, width=width, label=label)
    if chance:
        levels = [chance[name][0] if name in chance else None for name in TASKS] + [chance_average(chance)]
        labelled = False
        for g, level in enumerate(levels):
            if level is not None:
                ax.hlines(100 * level, g - 0.45, g + 0.45, colors="black", linestyles="dashed", linewidth=1.2,
                          label=None if labelled else "chance (uniform guess)")
                labelled = True
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title("Commonsense reasoning accuracy")
    ax.legend(fontsize="small")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    return buffer.getvalue()


def build_report(experiment_dir="experiment", out_dir=None) -> dict:
    """Rebuild results.md/.csv/.png in `out_dir` (default: `experiment_dir`); return their paths."""
    runs = collect_runs(load_summaries(experiment_dir))
    if not runs:
        raise ReportError(f"no evaluation summaries (*{SUMMARY_SUFFIX}) in {experiment_dir}")
    chance = chance_levels(runs, experiment_dir)
    out = Path(out_dir if out_dir is not None else experiment_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": out / "results.md", "csv": out / "results.csv", "png": out / "results.png"}
    png = chart_png(runs, chance)  # render everything before writing anything
    atomic_write_text(paths["markdown"], markdown_table(runs, chance))
    atomic_write_text(paths["csv"], csv_text(runs))
    atomic_write_bytes(paths["png"], png)
    return paths


def main(argv=None) -> int:
    parser = OneLineErrorParser(prog="python -m commonsense.report", description=__doc__.splitlines()[0])
    parser.add_argument("--experiment_dir", default="experiment")
    parser.add_argument("--out_dir", default=None, help="default: the experiment folder")
    args = parser.parse_args(argv)

    def run() -> int:
        paths = build_report(args.experiment_dir, args.out_dir)
        print(paths["markdown"].read_text(encoding="utf-8"), end="")
        for path in paths.values():
            print(f"wrote {path}")
        return 0

    return run_or_exit(run)


if __name__ == "__main__":
    sys.exit(main())
