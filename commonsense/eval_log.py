"""The resume log of an evaluation: finished examples appended to ``{out}.partial.jsonl``.

Its first line is a header (what must match for the logged examples to be reused); each
further line is one scored example. A rerun of the same evaluation reuses them; a different
run, a changed test file or a torn last line (a kill mid-write) only costs the work again.
"""
import os
import sys
from pathlib import Path

from commonsense.io import append_jsonl, read_jsonl


def partial_path(out_path) -> Path:
    out_path = Path(out_path)
    return out_path.with_name(out_path.name + ".partial.jsonl")


def fingerprint(task_name: str, mode: str, run, generation) -> dict:
    """The header: what must match for logged examples to be reused.

    ``run`` is the evaluation's RunInfo; ``generation`` the decoding settings as a dict, or
    None in loglik mode (decoding does not affect its scores). Batch size and limit are left
    out on purpose: results do not depend on them (batching is exact).
    """
    return {
        "task": task_name,
        "mode": mode,
        "base_model": None if run.base_model is None else str(run.base_model),
        "lora_weights": None if run.lora_weights is None else str(run.lora_weights),
        "adapter": run.adapter,
        "generation": generation,
    }


def load_finished(partial: Path, header: dict, rows: list, warn: bool = True) -> dict:
    """{index: scored row} from a previous interrupted run, or {} if there is none or it does not match.

    ``warn=False`` for a look ahead (the whole run's progress total), which the task repeats."""
    if not partial.exists():
        return {}
    records = read_jsonl(partial)
    if not records or records[0].get("header") != header:
        if warn:
            print(f"warning: {partial} is from a different run; starting over", file=sys.stderr)
        return {}
    finished = {}
    for record in records[1:]:
        index, scored = record.get("index"), record.get("result")
        # Same data as now? (the test file could have changed in between)
        if isinstance(index, int) and 0 <= index < len(rows) and isinstance(scored, dict) \
                and scored.get("instruction") == rows[index].get("instruction"):
            finished[index] = scored
    return finished


def restart_log(partial: Path, header: dict, finished: dict) -> None:
    """Start the log over with ``header`` and the ``finished`` examples still valid."""
    # Rewrite instead of appending: drops a torn last line and stale records.
    tmp = partial.with_name(partial.name + ".tmp")
    tmp.unlink(missing_ok=True)
    append_jsonl(tmp, [{"header": header}] + [{"index": i, "result": r} for i, r in sorted(finished.items())])
    os.replace(tmp, partial)


def log_finished(partial: Path, scored: dict) -> None:
    """Append a batch of finished examples ({index: scored row}) to the log."""
    append_jsonl(partial, [{"index": i, "result": r} for i, r in scored.items()])

