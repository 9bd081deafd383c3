"""How much of a batched evaluation's prompt tokens are padding: input order vs evaluate_task's batches.

Counts, per task, the padded share of the prompt tokens (pad / (pad + real)) when the rows are
batched in input order (as the original's create_batch) and as ``evaluation.make_batches``
forms them above batch 1 (longest prompt first). Token counts only: no model runs, so the
figures do not depend on the machine's load.

    python benchmarks/eval_padding.py [--base_model smollm2-135m] [--batch_size 8] [--tasks all] [--limit N]

Writes benchmarks/results/eval_padding.json (``--out``).
"""
import argparse
import sys
from datetime import datetime, timezone
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "peft" / "src"))
sys.path.insert(1, str(REPO_ROOT))

from commonsense.data import load_rows  # noqa: E402
from commonsense.evaluation import (  # noqa: E402
    dataset_file, input_order_batches, make_batches, prompt_lengths, resolve_task_names)
from commonsense.models import load_tokenizer, resolve_base_model  # noqa: E402
from harness import DEFAULT_RESULTS_DIR, write_result  # noqa: E402


def padded_share(batches, lengths) -> float:
    """Padding tokens over all tokens when each batch is padded to its longest prompt."""
    padded = sum(len(batch) * max(lengths[i] for i in batch) for batch in batches)
    return 1 - sum(lengths) / padded


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base_model", default="smollm2-135m", help="whose tokenizer counts the tokens")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--tasks", default="all")
    parser.add_argument("--limit", type=int, default=None, help="first N rows of each task (default: all)")
    parser.add_argument("--dataset_dir", default=str(REPO_ROOT / "dataset"))
    parser.add_argument("--out", default=str(DEFAULT_RESULTS_DIR / "eval_padding.json"))
    args = parser.parse_args(argv)
    if args.batch_size < 2:
        parser.error("--batch_size must be at least 2 (batch 1 has no padding)")
    if args.limit is not None and args.limit < 1:
        parser.error("--limit must be positive")

    tokenizer = load_tokenizer(resolve_base_model(args.base_model))
    tasks = {}
    print(f"{'task':<15} {'rows':>6} {'input order':>12} {'longest first':>14}")
    for task in resolve_task_names(args.tasks):
        rows = load_rows(dataset_file(args.dataset_dir, task), task=task)[:args.limit]
        lengths = prompt_lengths(tokenizer, [row["instruction"] for row in rows])
        in_order = input_order_batches(len(rows), args.batch_size)
        tasks[task] = {"rows": len(rows), "mean_prompt_tokens": sum(lengths) / len(lengths),
                       "padded_share_input_order": padded_share(in_order, lengths),
                       "padded_share_longest_first": padded_share(make_batches(lengths, args.batch_size), lengths)}
        t = tasks[task]
        print(f"{task:<15} {len(rows):>6} {t['padded_share_input_order']:>12.3f} {t['padded_share_longest_first']:>14.3f}")
    write_result(args.out, {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                            "command": " ".join([Path(sys.executable).name, *sys.argv]),
                            "base_model": args.base_model, "batch_size": args.batch_size, "tasks": tasks})
    return 0


if __name__ == "__main__":
    sys.exit(main())
