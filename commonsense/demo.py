"""The embedded demo: DoRA on SmolLM2-135M-Instruct, before/after on all 8 tasks, on a CPU.

1. convert the embedded SmolLM2 GGUF to a cached safetensors folder (once);
2. evaluate the base model on a fixed slice (the first N rows) of each of the 8 test sets;
3. DoRA fine-tune on a fixed slice of ``dataset/demo_train.json`` (the seed's targets,
   q/k/v/up/down, cutoff and dropout from ``commonsense.recipe``; a higher lr and a smaller
   batch than the seed's, so a few minutes of training show);
4. evaluate the fine-tuned model on the same slices;
5. print and write the results table (``results.md``, ``results.csv``, ``results.png``).

Everything goes to ``experiment/demo/`` (override with --output_dir). The defaults are
sized to finish within about 15 minutes on 2 CPU cores; a GPU is used when present.
Rerunning resumes finished evaluations; ``--fresh`` starts over.

    python -m commonsense.demo [--eval_limit 12] [--train_rows 224] [--fresh]
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from commonsense import recipe
from commonsense.cli import OneLineErrorParser, add_repo_paths, run_or_exit
from commonsense.embedded_model import SMOLLM2_ALIAS, SMOLLM2_NAME, prepare_embedded_model
from commonsense.train_options import FinetuneError, check_batch_sizes, check_positive_number

REPO_ROOT = Path(add_repo_paths())
MODEL_NAME = SMOLLM2_NAME
BASE_MODEL = SMOLLM2_ALIAS
DEMO_TRAIN = REPO_ROOT / "dataset" / "demo_train.json"


def parse_args(argv=None) -> argparse.Namespace:
    parser = OneLineErrorParser(prog="python -m commonsense.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", default=str(REPO_ROOT / "experiment" / "demo"))
    parser.add_argument("--eval_limit", type=int, default=12, help="first N rows of each test set")
    parser.add_argument("--train_rows", type=int, default=224, help="first N rows of dataset/demo_train.json")
    parser.add_argument("--num_epochs", type=float, default=1)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--lora_r", type=int, default=16)
    parser.add_argument("--lora_alpha", type=int, default=32, help="default 2r, as the seed")
    parser.add_argument("--micro_batch_size", type=int, default=4)
    parser.add_argument("--batch_size", type=int, default=8, help="training batch (gradient accumulation)")
    parser.add_argument("--eval_batch_size", type=int, default=8)
    parser.add_argument("--fresh", action="store_true", help="delete earlier demo outputs first")
    parser.add_argument("--debug", action="store_true")
    args = parser.parse_args(argv)
    for name in ("eval_limit", "train_rows", "lora_r", "lora_alpha", "micro_batch_size", "batch_size", "eval_batch_size"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name} must be positive")
    try:  # finetune's own checks, here rather than after the base model's evaluation
        check_positive_number("--num_epochs", args.num_epochs)
        check_positive_number("--learning_rate", args.learning_rate)
        check_batch_sizes(args.batch_size, args.micro_batch_size, world_size=1)
    except FinetuneError as err:
        parser.error(str(err))
    return args


def evaluate(run_adapter: str, lora_weights, args, out: Path) -> list:
    from commonsense.eval_model import load_model_for_eval
    from commonsense.evaluation import RunInfo, evaluate_tasks
    from commonsense.generation import GenerationSettings
    from commonsense.tasks import TASK_NAMES

    model, tokenizer = load_model_for_eval(BASE_MODEL, lora_weights=lora_weights, adapter=run_adapter)
    run = RunInfo(model_name=MODEL_NAME, adapter=run_adapter, base_model=BASE_MODEL,
                  lora_weights=None if lora_weights is None else str(lora_weights))
    # Beams stop at EOS (commonsense_evaluate.py --eos_stop): faster on a CPU than the
    # original's always-32-tokens decoding, which the seed scripts keep.
    return evaluate_tasks(model, tokenizer, TASK_NAMES, run=run, dataset_dir=REPO_ROOT / "dataset",
                          output_dir=out, batch_size=args.eval_batch_size, limit=args.eval_limit,
                          settings=GenerationSettings(stop_at_eos=True))


def write_train_slice(out: Path, n_rows: int) -> Path:
    from commonsense.data import load_rows
    from commonsense.io import atomic_write_json

    rows = load_rows(DEMO_TRAIN)
    if n_rows > len(rows):
        raise ValueError(f"--train_rows {n_rows} exceeds the {len(rows)} rows of {DEMO_TRAIN}")
    path = out / "train_slice.json"
    atomic_write_json(path, rows[:n_rows], indent=4)
    return path


def fine_tune(args, out: Path) -> Path:
    from commonsense.training import train

    adapter_dir = out / f"dora_r{args.lora_r}"
    if (adapter_dir / "adapter_config.json").exists() and (adapter_dir / "train_log.json").exists():
        print(f"using the adapter already trained in {adapter_dir} (--fresh retrains)")
        return adapter_dir
    train(
        base_model=BASE_MODEL,
        data_path=str(write_train_slice(out, args.train_rows)),
        output_dir=str(adapter_dir),
        adapter_name="dora",
        batch_size=args.batch_size,
        micro_batch_size=args.micro_batch_size,
        num_epochs=args.num_epochs,
        learning_rate=args.learning_rate,
        cutoff_len=recipe.CUTOFF_LEN,
        val_set_size=0,
        save_step=10_000,  # one save at the end: checkpoints cost time on a CPU
        lora_r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=recipe.LORA_DROPOUT,
        target_modules=recipe.TARGET_MODULES,
        warmup_steps=3,
    )
    return adapter_dir


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.output_dir)

    def run() -> int:
        from commonsense.report import build_report

        if args.fresh and out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
        started = time.time()
        timings = {}
        print(f"[1/4] preparing the embedded model ({BASE_MODEL})", flush=True)
        prepare_embedded_model(BASE_MODEL)
        print(f"[2/4] evaluating the base model on the first {args.eval_limit} rows of each test set", flush=True)
        t = time.time()
        evaluate("none", None, args, out)
        timings["eval_base_s"] = round(time.time() - t, 1)
        print(f"[3/4] DoRA fine-tuning (r={args.lora_r}) on {args.train_rows} rows of {DEMO_TRAIN.name}", flush=True)
        t = time.time()
        adapter_dir = fine_tune(args, out)
        timings["train_s"] = round(time.time() - t, 1)
        print("[4/4] evaluating the DoRA model on the same slices", flush=True)
        t = time.time()
        evaluate("DoRA", adapter_dir, args, out)
        timings["eval_dora_s"] = round(time.time() - t, 1)
        timings["total_s"] = round(time.time() - started, 1)
        paths = build_report(out)
        settings = {k: v for k, v in vars(args).items() if k not in ("debug", "fresh")}
        (out / "demo_run.json").write_text(json.dumps({"settings": settings, "timings": timings}, indent=2))
        print()
        print(paths["markdown"].read_text(encoding="utf-8"))
        print(f"timings: {timings}")
        print(f"wrote {', '.join(str(p) for p in paths.values())}")
        return 0

    return run_or_exit(run, debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
