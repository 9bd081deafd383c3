"""Loading, validating and assembling the commonsense instruction data.

Data format (LLM-Adapters): a JSON list of objects
    {"instruction": str, "input": str (optional, default ""), "output": str, "answer": str}
where "answer" is the gold label word (required for evaluation files).

CLI (run from the repository root):
    python -m commonsense.data build --source ../shared/data/commonsense --out commonsense_170k.json
    python -m commonsense.data validate dataset/boolq/test.json --task boolq
    python -m commonsense.data demo-slice --source ../shared/data/commonsense \
        --out dataset/demo_train.json --per_task 64 --seed 0

On bad input the CLI prints one "error: ..." line to stderr, exits with status 2
and writes no output file.
"""
import argparse
import json
import random
import sys
from pathlib import Path

from commonsense.cli import OneLineErrorParser, run_or_exit
from commonsense.io import atomic_write_json
from commonsense.tasks import TASK_NAMES, get_task

REPO_ROOT = Path(__file__).resolve().parent.parent
# The shared data checkout sits next to the repository (../shared) in this project.
SHARED_SOURCE_DIR = REPO_ROOT.parent / "shared" / "data" / "commonsense"

# HellaSwag's LLM-Adapters train file is not available; this is a rebuild from
# OLMES-preprocessed text with the right labels but different wording (see NOTES.md).
HELLASWAG_APPROX_TRAIN = "train_approx_olmes.json"


class DataError(ValueError):
    """A data file is missing or malformed; the message names the file (and row)."""


def default_source_dir():
    """../shared/data/commonsense relative to the repository root, or None if absent."""
    return SHARED_SOURCE_DIR if SHARED_SOURCE_DIR.is_dir() else None


# --------------------------------------------------------------------------- loading

def _read_json_values(path: Path):
    """Parse a .json file (one value) or a .jsonl file (list of per-line values)."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason})") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror})") from None

    if path.suffix == ".jsonl":
        values = []
        for line_no, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                values.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}: line {line_no} is not valid JSON ({exc.msg})") from None
        return values
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(
            f"{path}: not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})"
        ) from None


def _check_row(row, index: int, path: Path, task) -> dict:
    """Validate one row; return a copy with "input" defaulted to ""."""
    where = f"{path}: row {index}"
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected an object, got {type(row).__name__}")
    for field in ("instruction", "output"):
        if field not in row:
            raise DataError(f"{where}: missing required field {field!r}")
        if not isinstance(row[field], str):
            raise DataError(f"{where}: field {field!r} must be a string, got {type(row[field]).__name__}")
    if row.get("input") is not None and not isinstance(row["input"], str):
        raise DataError(f"{where}: field 'input' must be a string, got {type(row['input']).__name__}")
    if task is not None:
        # Evaluation compares the extracted label word with "answer", so it must be one.
        answer = row.get("answer")
        if answer not in task.labels:
            shown = "missing" if "answer" not in row else repr(answer)
            raise DataError(
                f"{where}: answer {shown} is not a {task.name} label ({', '.join(task.labels)})"
            )
    row = dict(row)
    if row.get("input") is None:
        row["input"] = ""
    return row


def load_rows(path, task=None) -> list:
    """Read and validate a data file; with `task`, every row needs a valid "answer".

    Raises DataError (a ValueError) naming the file and the first bad row index (0-based).
    """
    path = Path(path)
    task = get_task(task) if task is not None else None
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if not path.is_file():
        raise DataError(f"{path}: not a regular file")
    data = _read_json_values(path)
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of objects, got {type(data).__name__}")
    if not data:
        raise DataError(f"{path}: contains no rows")
    return [_check_row(row, i, path, task) for i, row in enumerate(data)]


def load_training_rows(data_path) -> list:
    """Training rows from a JSON/JSONL file, or, as the original finetune.py allowed, from a
    dataset that ``datasets.load_dataset`` can open by name (a hub id such as
    ``yahma/alpaca-cleaned``, or a local dataset folder): its "train" split, validated like a file."""
    text = str(data_path)
    if Path(text).is_file() or text.endswith((".json", ".jsonl")):
        return load_rows(text)
    from datasets import load_dataset

    try:
        dataset = load_dataset(text, split="train")
    except Exception as exc:  # noqa: BLE001 - offline, unknown id, no train split: one line names it
        from commonsense.models import hub_offline  # here: only a failed dataset load needs torch's import

        offline = " (HF_HUB_OFFLINE is set)" if hub_offline() else ""
        first = " ".join(str(exc).split())[:300] or type(exc).__name__
        raise DataError(f"data_path {text}: no such file, and loading it as a dataset{offline} failed: {first}") from None
    if len(dataset) == 0:
        raise DataError(f"data_path {text}: the dataset's train split has no rows")
    return [_check_row(row, i, Path(text), None) for i, row in enumerate(dataset)]


# --------------------------------------------------------------------------- building

def train_file(source_dir, task_name: str) -> Path:
    """Per-task training file; HellaSwag falls back to the approximate rebuild."""
    task_dir = Path(source_dir) / task_name
    path = task_dir / "train.json"
    if task_name == "hellaswag" and not path.exists() and (task_dir / HELLASWAG_APPROX_TRAIN).exists():
        print(
            f"warning: {path} not found; using {task_dir / HELLASWAG_APPROX_TRAIN}, an APPROXIMATE "
            "rebuild of LLM-Adapters' hellaswag training data (same labels, different text)",
            file=sys.stderr,
        )
        return task_dir / HELLASWAG_APPROX_TRAIN
    return path


def write_json_atomic(rows: list, out_path) -> None:
    """json.dump(rows, indent=4) to out_path so that readers never see a partial file."""
    out_path = Path(out_path)
    if not out_path.parent.is_dir():
        raise DataError(f"{out_path}: output directory {out_path.parent} does not exist")
    atomic_write_json(out_path, rows, indent=4)


def build_mix(source_dir, out_path, tasks=None, limit_per_task=None, seed=42) -> dict:
    """Concatenate per-task train files into one shuffled commonsense_170k-style file.

    With `limit_per_task`, each task contributes a seeded random subset of that size
    (all rows if it has fewer). Everything is loaded and validated before anything is
    written. Returns {task: row count}.
    """
    tasks = TASK_NAMES if tasks is None else [get_task(t).name for t in tasks]
    if len(set(tasks)) != len(tasks):
        raise DataError(f"tasks listed more than once: {', '.join(tasks)}")
    if limit_per_task is not None and limit_per_task < 1:
        raise DataError(f"limit_per_task must be a positive integer, got {limit_per_task}")
    if not Path(source_dir).is_dir():
        raise DataError(f"{source_dir}: source directory not found")

    mix, counts = [], {}
    for name in tasks:
        rows = load_rows(train_file(source_dir, name))
        if limit_per_task is not None and len(rows) > limit_per_task:
            # A per-task RNG (string seeds are deterministic) makes each task's subset
            # independent of which other tasks are included.
            picked = random.Random(f"{seed}:{name}").sample(range(len(rows)), limit_per_task)
            rows = [rows[i] for i in sorted(picked)]
        counts[name] = len(rows)
        mix.extend(rows)
        print(f"{name}: {len(rows)} rows")
    print(f"total: {len(mix)} rows")

    random.Random(seed).shuffle(mix)
    write_json_atomic(mix, out_path)
    print(f"wrote {out_path}")
    return counts


# --------------------------------------------------------------------------- CLI

def _resolve_source(source):
    if source is not None:
        return Path(source)
    found = default_source_dir()
    if found is None:
        raise DataError(f"no --source given and the default {SHARED_SOURCE_DIR} does not exist")
    return found


def _make_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(prog="python -m commonsense.data", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineErrorParser)

    build = sub.add_parser("build", help="build a commonsense_170k-style training mix")
    build.add_argument("--source", help="folder with <task>/train.json (default: ../shared/data/commonsense)")
    build.add_argument("--out", required=True, help="output JSON file")
    build.add_argument("--tasks", nargs="+", default=None, help=f"subset of {', '.join(TASK_NAMES)}")
    build.add_argument("--limit_per_task", type=int, default=None, help="seeded random subset size per task")
    build.add_argument("--seed", type=int, default=42)

    validate = sub.add_parser("validate", help="check a data file")
    validate.add_argument("file")
    validate.add_argument("--task", help="also require every answer to be one of this task's labels")

    demo = sub.add_parser("demo-slice", help="small fixed training file: N seeded rows per task")
    demo.add_argument("--source", help="folder with <task>/train.json (default: ../shared/data/commonsense)")
    demo.add_argument("--out", required=True)
    demo.add_argument("--per_task", type=int, default=64)
    demo.add_argument("--seed", type=int, default=0)
    return parser


def main(argv=None) -> int:
    args = _make_parser().parse_args(argv)

    def run() -> int:
        if args.command == "validate":
            rows = load_rows(args.file, task=args.task)
            suffix = f" (answers are {args.task} labels)" if args.task else ""
            print(f"{args.file}: {len(rows)} valid rows{suffix}")
        elif args.command == "build":
            build_mix(_resolve_source(args.source), args.out, tasks=args.tasks,
                      limit_per_task=args.limit_per_task, seed=args.seed)
        else:  # demo-slice: a build with a small fixed per-task sample
            build_mix(_resolve_source(args.source), args.out,
                      limit_per_task=args.per_task, seed=args.seed)
        return 0

    return run_or_exit(run)


if __name__ == "__main__":
    sys.exit(main())
