"""The training data of a comparison: the commonsense mix, and with a row budget its seeded sample."""
from __future__ import annotations

import json
import random
from pathlib import Path

from commonsense.reproduce.plan import ReproductionError, Settings, task_names


def resolve_source_dir(source_dir) -> Path:
    """--source_dir, or the shared data folder when it is not given; a clear error if missing."""
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
    mix_counts = build_mix(settings.source_dir, mix_path, seed=settings.data_seed)
    record = {"mix_path": str(mix_path), "mix_rows": sum(mix_counts.values()), "mix_per_task": mix_counts}
    if settings.full:
        record.update(path=str(mix_path), rows=record["mix_rows"], per_task=mix_counts)
    else:
        subset = sample_rows(load_rows(mix_path), settings.train_rows, settings.data_seed)
        subset_path = data_dir / f"train_subset_{settings.train_rows}_seed{settings.data_seed}.json"
        atomic_write_json(subset_path, subset, indent=4)
        record.update(path=str(subset_path), rows=len(subset),
                      per_task=count_tasks(subset, task_index(settings.source_dir)))
    hellaswag = Path(settings.source_dir) / "hellaswag"
    record["hellaswag_train_is_approximate"] = not (hellaswag / "train.json").exists()
    atomic_write_json(record_path, record, indent=2)
    return record


def planned_rows(out: Path, settings: Settings) -> int:
    """The training data's rows without building it (the dry run): recorded, the subset, or the mix."""
    from commonsense.data import load_rows, train_file

    record_path = out / "data" / "train_data.json"
    if record_path.exists():
        return json.loads(record_path.read_text(encoding="utf-8"))["rows"]
    if not settings.full:
        return settings.train_rows
    return sum(len(load_rows(train_file(settings.source_dir, name))) for name in task_names())


def source_rows(settings: Settings) -> list:
    """Every training row of the source folder (the mix, unshuffled): the dry run samples its lengths."""
    from commonsense.data import load_rows, train_file

    return [row for name in task_names() for row in load_rows(train_file(settings.source_dir, name))]
