"""The command line: ``python -m commonsense.reproduce`` (and ``bash reproduce_smollm2.sh``)."""
from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from commonsense import recipe
from commonsense.cli import OneLineErrorParser, add_repo_paths, run_or_exit
from commonsense.reproduce.plan import BASE_MODEL, DEFAULT_RUNS, REPO_ROOT, Settings, parse_runs
from commonsense.reproduce.report import REPORT_JSON, REPORT_MD, REPORT_PNG, rebuild_report
from commonsense.reproduce.runner import run_comparison
from commonsense.reproduce.training_data import resolve_source_dir

add_repo_paths()  # the vendored fork first, for the in-process steps (model preparation, result files)
DEFAULT_OUTPUT_DIR = REPO_ROOT / "experiment" / "reproduction_runs"
DEFAULT_REPORT_DIR = REPO_ROOT / "experiment"
DESCRIPTION = "The paper's LoRA-vs-DoRA commonsense comparison, rerun on SmolLM2-135M-Instruct with one command."


def parse_args(argv=None) -> argparse.Namespace:
    parser = OneLineErrorParser(prog="python -m commonsense.reproduce", description=DESCRIPTION)
    parser.add_argument("--train_rows", type=int, default=256,
                        help="CPU subset: rows sampled (seeded) from the mix (default 256 = 16 steps per epoch; the recorded run, about an hour on 2 cores)")
    parser.add_argument("--full", action="store_true",
                        help="GPU scale: the whole mix and the full test sets (ignores the row limits)")
    parser.add_argument("--num_epochs", type=float, default=1, help=f"epochs per run (the seed used {recipe.EPOCHS})")
    parser.add_argument("--eval_limit_generate", type=int, default=16, help="first N rows of each test set, generate")
    parser.add_argument("--eval_limit_loglik", type=int, default=64, help="first N rows of each test set, loglik")
    parser.add_argument("--seed", type=int, default=42, help="training seed and subset seed")
    parser.add_argument("--runs", default=",".join(DEFAULT_RUNS), help="comma list of base, lora_rN, dora_rN")
    parser.add_argument("--output_dir", default=str(DEFAULT_OUTPUT_DIR), help="per-run adapters, logs, results")
    parser.add_argument("--report_dir", default=str(DEFAULT_REPORT_DIR),
                        help=f"where {REPORT_MD}, {REPORT_JSON} and {REPORT_PNG} go")
    parser.add_argument("--source_dir", default=None,
                        help="folder with <task>/train.json (default: ../shared/data/commonsense)")
    parser.add_argument("--micro_batch_size", type=int, default=4,
                        help=f"per-step batch; the global batch stays {recipe.BATCH_SIZE}")
    parser.add_argument("--eval_batch_size", type=int, default=8)
    parser.add_argument("--base_model", default=BASE_MODEL, help=argparse.SUPPRESS)  # tests: a tiny model folder
    parser.add_argument("--fresh", action="store_true", help="delete OUTPUT_DIR's earlier runs first")
    parser.add_argument("--report_only", action="store_true", help=f"rebuild the report from {REPORT_JSON} only")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    args = parser.parse_args(argv)
    for name in ("train_rows", "eval_limit_generate", "eval_limit_loglik", "micro_batch_size", "eval_batch_size"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name} must be a positive integer, got {getattr(args, name)}")
    if not args.num_epochs > 0:
        parser.error(f"--num_epochs must be positive, got {args.num_epochs:g}")
    if recipe.BATCH_SIZE % args.micro_batch_size:
        parser.error(f"--micro_batch_size must divide the global batch {recipe.BATCH_SIZE}, got {args.micro_batch_size}")
    return args


def settings_from_args(args, source_dir: Path) -> Settings:
    return Settings(
        base_model=args.base_model,
        source_dir=str(source_dir),
        full=args.full,
        train_rows=None if args.full else args.train_rows,
        num_epochs=args.num_epochs,
        eval_limit_generate=None if args.full else args.eval_limit_generate,
        eval_limit_loglik=None if args.full else args.eval_limit_loglik,
        seed=args.seed,
        micro_batch_size=args.micro_batch_size,
    )


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    # The wrapper script names itself, so the report shows the command the user typed.
    launcher = os.environ.get("REPRODUCE_LAUNCHER", "python -m commonsense.reproduce")
    command = " ".join([launcher, shlex.join(argv)]).strip()

    def run() -> int:
        if args.report_only:
            paths = rebuild_report(Path(args.report_dir))
        else:
            specs = parse_runs(args.runs)  # a bad --runs fails before any work
            settings = settings_from_args(args, resolve_source_dir(args.source_dir))
            paths = run_comparison(specs, settings, Path(args.output_dir).resolve(), Path(args.report_dir).resolve(),
                                   eval_batch_size=args.eval_batch_size, command=command, fresh=args.fresh)
        print(f"report: {paths['markdown']}")
        return 0

    try:
        return run_or_exit(run, debug=args.debug)
    except KeyboardInterrupt:
        print("error: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
