"""The command line: ``python -m commonsense.reproduce`` (and ``bash reproduce_smollm2.sh``, its default preset)."""
from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from commonsense import recipe
from commonsense.cli import OneLineErrorParser, add_repo_paths, run_or_exit
from commonsense.reproduce.grid import DEFAULT_RANKS, check_seeds, grid_runs, plan_text
from commonsense.reproduce.plan import BASE_MODEL, DEFAULT_RUNS, DEFAULT_SEED, METHODS, MODES, REPO_ROOT, Settings, parse_runs
from commonsense.reproduce.report import REPORT_JSON, REPORT_MD, REPORT_PNG, REPORT_RANK_PNG, rebuild_report
from commonsense.reproduce.runner import check_or_record_settings, run_grid
from commonsense.reproduce.scheduler import check_gpus, parse_gpus
from commonsense.reproduce.training_data import planned_rows, resolve_source_dir, source_rows

add_repo_paths()  # the vendored fork first, for the in-process steps (model preparation, result files)
DEFAULT_OUTPUT_DIR = REPO_ROOT / "experiment" / "reproduction_runs"
DEFAULT_REPORT_DIR = REPO_ROOT / "experiment"
DESCRIPTION = ("The paper's LoRA-vs-DoRA commonsense comparison as a grid of methods x ranks x lrs x seeds, "
               "spread over the GPUs (default: the recorded SmolLM2 comparison, one seed).")


def parse_args(argv=None) -> argparse.Namespace:
    parser = OneLineErrorParser(prog="python -m commonsense.reproduce", description=DESCRIPTION)
    grid = parser.add_argument_group("the grid (default: --runs " + ",".join(DEFAULT_RUNS) + ")")
    grid.add_argument("--methods", nargs="+", metavar="METHOD",
                      help=f"any of {', '.join(METHODS)} (base: the base model, evaluated once; ft has no rank)")
    grid.add_argument("--ranks", nargs="+", type=int, metavar="R",
                      help=f"ranks of lora and dora (default with --methods: {' '.join(map(str, DEFAULT_RANKS))})")
    grid.add_argument("--seeds", nargs="+", type=int, metavar="S",
                      help=f"run seeds: finetune.py --seed, i.e. initialisation and data order (default {DEFAULT_SEED})")
    grid.add_argument("--lrs", nargs="+", type=float, metavar="LR",
                      help="learning rates for every trained method (default: the seed's per method and rank, "
                           "LoRA 3e-4, DoRA 2e-4 but r32 1e-4, FT 2e-5)")
    grid.add_argument("--runs", default=None,
                      help="an explicit comma list instead: base, ft, lora_rN, dora_rN, each optionally _lrX "
                           "(e.g. dora_r32_lr2e-4); one run per seed")
    grid.add_argument("--modes", nargs="+", default=list(MODES), metavar="MODE",
                      help="evaluation modes: generate, loglik or both (default both)")
    parser.add_argument("--base_model", default=BASE_MODEL, help="hub id, model folder or smollm2-135m (default)")
    parser.add_argument("--train_rows", type=int, default=256,
                        help="CPU subset: rows sampled (data seed) from the mix (default 256 = 16 steps per epoch)")
    parser.add_argument("--full", action="store_true",
                        help="the seed's scale: the whole mix, 3 epochs, its validation split, the full test sets")
    parser.add_argument("--num_epochs", type=float, default=None,
                        help=f"epochs per run (default 1; {recipe.EPOCHS} with --full, as the seed)")
    parser.add_argument("--eval_limit_generate", type=int, default=16, help="first N rows of each test set, generate")
    parser.add_argument("--eval_limit_loglik", type=int, default=64, help="first N rows of each test set, loglik")
    parser.add_argument("--data_seed", type=int, default=42, help="the mix's shuffle and the subset's sample")
    parser.add_argument("--gpus", default=None, help="GPU ids, e.g. 0,1,2,3: one job per GPU at a time "
                                                     "(default: one job at a time on the default device)")
    parser.add_argument("--gpus_per_run", type=int, default=1, help="GPUs per training (DDP); must divide --gpus")
    parser.add_argument("--dry_run", action="store_true",
                        help="print the plan and an estimated time (from a short measured step) and stop")
    parser.add_argument("--no_measure", action="store_true", help="with --dry_run: skip the measurement")
    parser.add_argument("--output_dir", default=str(DEFAULT_OUTPUT_DIR), help="per-run adapters, logs, results")
    parser.add_argument("--report_dir", default=str(DEFAULT_REPORT_DIR),
                        help=f"where {REPORT_MD}, {REPORT_JSON}, {REPORT_PNG} and {REPORT_RANK_PNG} go")
    parser.add_argument("--source_dir", default=None,
                        help="folder with <task>/train.json (default: ../shared/data/commonsense)")
    parser.add_argument("--micro_batch_size", type=int, default=4,
                        help=f"per-step batch; the global batch stays {recipe.BATCH_SIZE}")
    parser.add_argument("--eval_batch_size", type=int, default=8)
    parser.add_argument("--fresh", action="store_true", help="delete OUTPUT_DIR's earlier runs first")
    parser.add_argument("--report_only", action="store_true", help=f"rebuild the report from {REPORT_JSON} only")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    args = parser.parse_args(argv)
    for name in ("train_rows", "eval_limit_generate", "eval_limit_loglik", "micro_batch_size", "eval_batch_size"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name} must be a positive integer, got {getattr(args, name)}")
    if args.num_epochs is None:
        args.num_epochs = float(recipe.EPOCHS) if args.full else 1.0
    if not args.num_epochs > 0:
        parser.error(f"--num_epochs must be positive, got {args.num_epochs:g}")
    if recipe.BATCH_SIZE % args.micro_batch_size:
        parser.error(f"--micro_batch_size must divide the global batch {recipe.BATCH_SIZE}, got {args.micro_batch_size}")
    if args.runs is not None and (args.methods or args.ranks or args.lrs):
        parser.error("--runs is an explicit list of runs: give it or --methods/--ranks/--lrs, not both")
    if args.methods is None and (args.ranks or args.lrs):
        parser.error("--ranks and --lrs need --methods (e.g. --methods lora dora)")
    for mode in args.modes:
        if mode not in MODES:
            parser.error(f"unknown mode {mode!r} in --modes; use {' or '.join(MODES)}")
    if len(set(args.modes)) != len(args.modes):
        parser.error(f"--modes lists a mode twice: {' '.join(args.modes)}")
    if args.no_measure and not args.dry_run:
        parser.error("--no_measure goes with --dry_run")
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
        data_seed=args.data_seed,
        micro_batch_size=args.micro_batch_size,
    )


def runs_from_args(args) -> list:
    seeds = args.seeds or [DEFAULT_SEED]
    if args.methods is None:
        check_seeds(seeds)
        return parse_runs(args.runs or ",".join(DEFAULT_RUNS), seeds)
    return grid_runs(args.methods, args.ranks or DEFAULT_RANKS, seeds, args.lrs)


def dry_run(args, specs: list, settings: Settings, gpus) -> None:
    from commonsense.reproduce.estimate import count_test_rows, measure_timing

    out = Path(args.output_dir).resolve()
    if out.exists():
        check_or_record_settings(out, settings, record=False)  # refuse now what the real run would refuse
    timing = None
    if not args.no_measure:
        print("measuring a few training and evaluation steps for the estimate...", file=sys.stderr, flush=True)
        timing = measure_timing(settings.base_model, args.modes, settings.micro_batch_size, args.eval_batch_size,
                                source_rows(settings))
    print(plan_text(specs, args.modes, settings, planned_rows(out, settings), count_test_rows(), gpus=gpus,
                    gpus_per_run=args.gpus_per_run, timing=timing), end="")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    # The wrapper script names itself, so the report shows the command the user typed.
    launcher = os.environ.get("REPRODUCE_LAUNCHER", "python -m commonsense.reproduce")
    command = " ".join([launcher, shlex.join(argv)]).strip()

    def run() -> int:
        if args.report_only:
            paths = rebuild_report(Path(args.report_dir))
            print(f"report: {paths['markdown']}")
            return 0
        specs = runs_from_args(args)  # bad runs fail before any work
        gpus = parse_gpus(args.gpus) if args.gpus is not None else None
        check_gpus(gpus or [], args.gpus_per_run)
        settings = settings_from_args(args, resolve_source_dir(args.source_dir))
        if args.dry_run:
            dry_run(args, specs, settings, gpus)
            return 0
        paths = run_grid(specs, args.modes, settings, Path(args.output_dir).resolve(),
                         Path(args.report_dir).resolve(), eval_batch_size=args.eval_batch_size, command=command,
                         fresh=args.fresh, gpus=gpus, gpus_per_run=args.gpus_per_run)
        print(f"report: {paths['markdown']}")
        return 0

    try:
        return run_or_exit(run, debug=args.debug)
    except KeyboardInterrupt:
        print("error: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
