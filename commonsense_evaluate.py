"""Evaluate a (LoRA/DoRA-tuned) causal LM on the commonsense test sets.

Same flags and output files as NVlabs/DoRA commonsense_evaluate.py, e.g.

    python commonsense_evaluate.py --model LLaMA-7B --adapter DoRA --dataset boolq \
        --base_model yahma/llama-7b-hf --lora_weights finetuned_result/dora_r32 --batch_size 1

writes experiment/LLaMA-7B-DoRA-boolq.json (per-example predictions) and
experiment/LLaMA-7B-DoRA-boolq.summary.json. Additions: --dataset takes a comma
list or "all" (the model is loaded once), --adapter none evaluates the base
model, --limit N evaluates the first N rows, an interrupted run resumes, and
--mode loglik ranks the answer continuations by log-likelihood instead of
generating (files end in -loglik.json; --mode generate, the original, is the default).

Bad input prints one "error: ..." line to stderr and exits with status 2; --debug shows the
traceback instead (commonsense/cli.py lists the exit codes).
"""
import argparse
import sys
from pathlib import Path

from commonsense.cli import OneLineErrorParser, add_repo_paths, run_or_exit

REPO_ROOT = Path(add_repo_paths())  # the vendored PEFT fork must shadow any pip-installed peft


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _model_name(text):
    from commonsense.evaluation import EvaluationError, check_model_name

    try:
        return check_model_name(text)
    except EvaluationError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def parse_args(argv=None):
    from commonsense.evaluation import MODEL_NAMES, MODES

    parser = OneLineErrorParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", required=True,
                        help="task name (boolq, piqa, social_i_qa, hellaswag, winogrande, ARC-Challenge, "
                             "ARC-Easy, openbookqa), a comma list, or 'all'")
    parser.add_argument("--model", required=True, type=_model_name,
                        help=f"a label for the output file names only, any plain name (e.g. {', '.join(MODEL_NAMES)})")
    parser.add_argument("--adapter", required=True,
                        help="LoRA, DoRA, FT (a fully fine-tuned --base_model) or none (case-insensitive)")
    parser.add_argument("--base_model", required=True, help="hub id, local model folder or smollm2-135m")
    parser.add_argument("--lora_weights", default=None, help="adapter folder or hub id (required unless --adapter none or FT)")
    parser.add_argument("--batch_size", type=_positive_int, default=1)
    parser.add_argument("--load_8bit", action="store_true", default=False, help="LLM.int8 base weights (bitsandbytes)")
    parser.add_argument("--dtype", choices=("auto", "fp16", "bf16", "fp32"), default="auto",
                        help="base weights: auto = fp16 on CUDA (as the original), fp32 on CPU")
    parser.add_argument("--load_4bit", action="store_true", default=False, help="NF4 base weights, QLoRA/QDoRA (bitsandbytes)")
    parser.add_argument("--limit", type=_positive_int, default=None, help="evaluate only the first N rows")
    parser.add_argument("--output_dir", default="experiment")
    parser.add_argument("--dataset_dir", default=str(REPO_ROOT / "dataset"))
    parser.add_argument("--mode", choices=MODES, default="generate",
                        help="generate: beam search + answer regex (the original); "
                             "loglik: pick the most likely answer continuation")
    eos = parser.add_mutually_exclusive_group()
    eos.add_argument("--eos_stop", action="store_true",
                     help="stop each beam at EOS (faster; the original always generates 32 tokens)")
    eos.add_argument("--no_eos_stop", action="store_true",
                     help="always generate 32 tokens, as the original: the default (kept for older commands)")
    parser.add_argument("--task_log_dir", default=None,
                        help="also append each task's output to DIR/<task>.txt (as the seed scripts' tee)")
    parser.add_argument("--verbose", action="store_true", help="print every example, as the original")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser.parse_args(argv)


def validate_inputs(args):
    """Check everything possible before loading a model; return (adapter, task names)."""
    from commonsense.data import load_rows
    from commonsense.eval_model import check_adapter_args
    from commonsense.evaluation import dataset_file, resolve_task_names
    from commonsense.io import check_writable_dir

    tasks = resolve_task_names(args.dataset)
    adapter = check_adapter_args(args.adapter, args.lora_weights)
    for name in tasks:  # fail on a bad test file before spending minutes loading the model
        load_rows(dataset_file(args.dataset_dir, name), task=name)
    check_writable_dir(args.output_dir, "--output_dir")
    if args.task_log_dir:
        check_writable_dir(args.task_log_dir, "--task_log_dir")
    return adapter, tasks


def print_table(summaries):
    """Accuracy per task and the average; examples/s over what this run scored (resumed ones left out)."""
    print(f"mode: {summaries[0].get('mode', 'generate')}")
    print(f"{'task':<12} {'n':>6} {'correct':>8} {'accuracy':>9} {'examples/s':>11}")
    for s in summaries:
        speed = f"{s['examples_per_s']:.3g}" if s.get("examples_per_s") else "-"
        print(f"{s['task']:<12} {s['n']:>6} {s['correct']:>8} {100 * s['accuracy']:>8.1f}% {speed:>11}")
    mean = sum(s["accuracy"] for s in summaries) / len(summaries)
    print(f"{'average':<12} {'':>6} {'':>8} {100 * mean:>8.1f}%")


def run(args):
    from commonsense.eval_model import load_model_for_eval
    from commonsense.evaluation import RunInfo, evaluate_tasks
    from commonsense.generation import GenerationSettings
    from commonsense.report import build_report

    adapter, tasks = validate_inputs(args)
    model, tokenizer = load_model_for_eval(
        args.base_model, lora_weights=args.lora_weights, adapter=adapter,
        load_8bit=args.load_8bit, load_4bit=args.load_4bit, dtype=args.dtype,
    )
    run_info = RunInfo(model_name=args.model, adapter=adapter, base_model=args.base_model,
                       lora_weights=args.lora_weights)
    summaries = evaluate_tasks(
        model, tokenizer, tasks, run=run_info, dataset_dir=args.dataset_dir, output_dir=args.output_dir,
        batch_size=args.batch_size, limit=args.limit,
        settings=GenerationSettings(stop_at_eos=args.eos_stop), mode=args.mode, verbose=args.verbose,
        task_log_dir=args.task_log_dir,
    )
    print("test finished")
    if len(summaries) > 1:
        print_table(summaries)
    paths = build_report(args.output_dir)  # the table over every run in output_dir so far
    print(f"results table: {paths['markdown']} (and .csv, .png)")
    return 0


def main(argv=None):
    args = parse_args(argv)
    return run_or_exit(lambda: run(args), debug=args.debug, resume_hint="rerun the same command to resume")


if __name__ == "__main__":
    sys.exit(main())
