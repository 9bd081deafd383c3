"""Evaluation throughput: the original generation protocol vs batched generation vs loglik.

Runs one model over a fixed slice (default: the first 16 rows of boolq and of
piqa) under the chosen settings (``--configs``, default all) and reports examples/s
and the speedup over (a), which always runs:

  (a) original   batch 1, 4 beams, no EOS stop (always 32 new tokens, as
                 transformers 4.36 did in the original code)
  (b) batched    batch B, 4 beams, stop at EOS (--eos_stop; the default is (c)'s 32 tokens)
  (c) batched    batch B, 4 beams, no EOS stop -- must give exactly (a)'s
                 predictions (batching is exact); the number of differences is printed
  (h) batched    as (c), the batches evaluate_task forms: longest prompt first (less
                 padding); must equal (a)
  (j) batched    as (h), with a static KV cache (transformers' cache_implementation="static";
                 on CUDA generate then compiles the decoding step); must equal (a)
  (d) loglik     batch B, shared prompt (commonsense.loglik.score_choices)
  (e) loglik     batch B, per choice: the whole prompt once per choice, as before the
                 shared prompt (tests/loglik_reference.py)
  (f) loglik     batch 1, shared prompt
  (g) loglik     batch 1, per choice
  (i) loglik     batch B, shared prompt + template prefix: each task's prompts start from one
                 KV cache of the tokens they all share (commonsense.loglik.prompt_prefix, built
                 per task inside the timing, as evaluate_task does); beside (d), or beside (f)
                 with --batch_size 1

The loglik predictions must agree between shared (with or without the prefix) and per-choice
at each batch size;
the differences and the largest score difference are printed.

(b) may legitimately differ from (a): stopping at EOS changes which beams win
when a finished beam would otherwise keep being extended. Model loading and a
small warm-up are excluded from the timings.

    python benchmarks/eval_speed.py --base_model smollm2-135m [--tasks boolq,piqa] [--limit 16] [--configs a,d,e,f,g] [--threads 1]

Writes benchmarks/results/eval_speed_cpu.json (``--out``).
"""
import argparse
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "peft" / "src"))  # the vendored fork first, as the entry scripts do
sys.path.insert(1, str(REPO_ROOT))
sys.path.insert(2, str(REPO_ROOT / "tests"))  # the per-choice reference scorer

import torch  # noqa: E402

from commonsense.data import load_rows  # noqa: E402
from commonsense.eval_model import load_model_for_eval  # noqa: E402
from commonsense.evaluation import dataset_file, input_order_batches, prompt_batches, resolve_task_names  # noqa: E402
from commonsense.generation import GenerationSettings, generate_responses, score_row  # noqa: E402
from commonsense.loglik import prompt_prefix, score_choices, score_row_loglik  # noqa: E402
from commonsense.machine import machine_info  # noqa: E402
from commonsense.prompts import evaluation_prompt_ids  # noqa: E402
from harness import DEFAULT_RESULTS_DIR, write_result  # noqa: E402
from loglik_reference import score_choices_per_choice  # noqa: E402


def run_generate(model, tokenizer, data, batch_size, settings, sort_by_length=False, cache_implementation=None):
    """Predictions {(task, index): pred} and elapsed seconds for generation-based evaluation.

    With sort_by_length the batches are evaluate_task's (longest prompt first, less padding);
    without, the rows in input order. Predictions stay keyed by the row's index.
    """
    preds = {}
    started = time.perf_counter()
    for task, rows in data.items():
        if sort_by_length:
            batches = prompt_batches(tokenizer, [row["instruction"] for row in rows], batch_size)
        else:
            batches = input_order_batches(len(rows), batch_size)
        for batch in batches:
            responses = generate_responses(model, tokenizer, [rows[i]["instruction"] for i in batch], settings,
                                           cache_implementation)
            for index, response in zip(batch, responses):
                preds[(task, index)] = score_row(task, rows[index], response)
    return preds, time.perf_counter() - started


def run_loglik(model, tokenizer, data, batch_size, scorer=score_choices, template_prefix=False):
    """Predictions {(task, index): pred} and elapsed seconds, in evaluate_task's batches (longest prompt first)."""
    preds = {}
    started = time.perf_counter()
    for task, rows in data.items():
        instructions = [row["instruction"] for row in rows]
        prompt_ids = evaluation_prompt_ids(tokenizer, instructions)  # once, as evaluate_task does
        prefix = ({"prefix": prompt_prefix(model, tokenizer, instructions, prompt_ids), "prompt_ids": prompt_ids}
                  if template_prefix else {})
        for batch in prompt_batches(tokenizer, instructions, batch_size, prompt_ids):
            all_scores = scorer(model, tokenizer, task, [instructions[i] for i in batch], **prefix)
            for index, scores in zip(batch, all_scores):
                preds[(task, index)] = score_row_loglik(task, rows[index], scores)
    return preds, time.perf_counter() - started


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base_model", default="smollm2-135m")
    parser.add_argument("--lora_weights", default=None, help="an adapter folder, merged into the base (default: none)")
    parser.add_argument("--tasks", default="boolq,piqa")
    parser.add_argument("--limit", type=int, default=16, help="first N rows of each task")
    parser.add_argument("--batch_size", type=int, default=8, help="batch size of (b), (c), (d), (e), (h), (i) and (j)")
    parser.add_argument("--configs", default="a,b,c,d,e,f,g,h,i,j", help="which settings to run; (a) always runs")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--dataset_dir", default=str(REPO_ROOT / "dataset"))
    parser.add_argument("--out", default=str(DEFAULT_RESULTS_DIR / "eval_speed_cpu.json"))
    args = parser.parse_args(argv)
    if args.limit < 1 or args.batch_size < 1:
        parser.error("--limit and --batch_size must be positive")

    if args.threads:
        torch.set_num_threads(args.threads)
    wanted = set(args.configs.split(",")) | {"a"}
    tasks = resolve_task_names(args.tasks)
    data = {t: load_rows(dataset_file(args.dataset_dir, t), task=t)[:args.limit] for t in tasks}
    n = sum(len(rows) for rows in data.values())
    load_before = os.getloadavg()
    model, tokenizer = load_model_for_eval(args.base_model, lora_weights=args.lora_weights,
                                           adapter="DoRA" if args.lora_weights else "none")
    # Warm-up (first-call allocations, kernel selection) outside the timings.
    first = next(iter(data.values()))[0]["instruction"]
    generate_responses(model, tokenizer, [first], GenerationSettings(max_new_tokens=2))
    score_choices(model, tokenizer, tasks[0], [first])

    B = args.batch_size
    configs = [
        ("a", "original: batch 1, 4 beams, no EOS stop (32 tokens)", "generate", 1,
         GenerationSettings(stop_at_eos=False)),
        ("b", f"batched: batch {B}, 4 beams, EOS stop (--eos_stop)", "generate", B,
         GenerationSettings(stop_at_eos=True)),
        ("c", f"batched: batch {B}, 4 beams, no EOS stop", "generate", B, GenerationSettings(stop_at_eos=False)),
        ("h", f"batched: batch {B}, 4 beams, no EOS stop, length-sorted", "generate-sorted", B,
         GenerationSettings(stop_at_eos=False)),
        ("j", f"batched: batch {B}, 4 beams, no EOS stop, length-sorted, static cache", "generate-static", B,
         GenerationSettings(stop_at_eos=False)),
        ("d", f"loglik: batch {B}, shared prompt", "loglik", B, None),
        ("e", f"loglik: batch {B}, per choice (before)", "loglik-per-choice", B, None),
        ("f", "loglik: batch 1, shared prompt", "loglik", 1, None),
        ("g", "loglik: batch 1, per choice (before)", "loglik-per-choice", 1, None),
        ("i", f"loglik: batch {B}, shared prompt + template prefix", "loglik-prefix", B, None),
    ]
    unknown = wanted - {key for key, *_ in configs}
    if unknown:
        parser.error(f"unknown --configs {','.join(sorted(unknown))}")
    results, scores = {}, {}
    for key, label, mode, batch_size, settings in configs:
        if key not in wanted:
            continue
        print(f"running ({key}) {label} ...", file=sys.stderr, flush=True)
        if mode.startswith("loglik"):
            scorer = score_choices_per_choice if mode == "loglik-per-choice" else score_choices
            preds, elapsed = run_loglik(model, tokenizer, data, batch_size, scorer,
                                        template_prefix=mode == "loglik-prefix")
            scores[key] = [preds[k]["scores"] for k in sorted(preds)]
        else:
            preds, elapsed = run_generate(model, tokenizer, data, batch_size, settings,
                                          sort_by_length=mode in ("generate-sorted", "generate-static"),
                                          cache_implementation="static" if mode == "generate-static" else None)
        results[key] = {"label": label, "mode": mode, "batch_size": batch_size,
                        "generation": None if settings is None else settings.to_dict(),
                        "elapsed_s": round(elapsed, 3), "examples_per_s": n / elapsed,
                        "accuracy": sum(p["flag"] for p in preds.values()) / n, "preds": preds}

    base = results["a"]
    keys = sorted(base["preds"])

    def differences(other, against="a"):
        return sum(results[other]["preds"][k]["pred"] != results[against]["preds"][k]["pred"] for k in keys)

    diffs = {f"{key}_vs_a_pred": differences(key) for key in results if key != "a"}
    for key in ("c", "h", "j"):  # must equal (a) answer by answer; compare the full generated text too
        if key in results:
            diffs[f"{key}_vs_a_output_text"] = sum(
                results[key]["preds"][k]["output_pred"] != base["preds"][k]["output_pred"] for k in keys)
    # Each shared-prompt config beside the per-choice one at its batch size ((i) at batch 1: (g)).
    pairs = (("d", "e"), ("f", "g"), ("i", "g" if B == 1 and "e" not in results else "e"))
    for shared, per_choice in pairs:  # the shared prompt must not change any loglik answer
        if shared in results and per_choice in results:
            diffs[f"{shared}_vs_{per_choice}_pred"] = differences(per_choice, shared)
            diffs[f"{shared}_vs_{per_choice}_max_score_diff"] = max(
                abs(a[label] - b[label]) for a, b in zip(scores[shared], scores[per_choice]) for label in a)

    print(f"\n{n} examples ({', '.join(f'{t}[:{len(r)}]' for t, r in data.items())}), "
          f"model {args.base_model}{' + ' + args.lora_weights if args.lora_weights else ''}, torch threads {torch.get_num_threads()}")
    print(f"load average before {load_before}, after {os.getloadavg()}")
    print(f"{'config':<52} {'s':>8} {'ex/s':>8} {'speedup':>8} {'acc':>6}")
    for key, r in results.items():
        print(f"({key}) {r['label']:<48} {r['elapsed_s']:>8.1f} {r['examples_per_s']:>8.3f} "
              f"{r['examples_per_s'] / base['examples_per_s']:>7.2f}x {100 * r['accuracy']:>5.1f}%")
    for key in (k for k in ("d", "f", "i") if f"{k}_vs_a_pred" in diffs):
        print(f"({key}) shared-prompt loglik: {results[key]['examples_per_s'] / base['examples_per_s']:.2f}x (a)")
    print("differences (c, h and j vs a, shared vs per-choice loglik should be 0): "
          + ", ".join(f"{k} {v:.2g}" if isinstance(v, float) else f"{k} {v}" for k, v in diffs.items()))
    for shared, per_choice in pairs:
        if shared in results and per_choice in results:
            print(f"({shared}) vs ({per_choice}): shared prompt {results[shared]['examples_per_s'] / results[per_choice]['examples_per_s']:.2f}x"
                  " the per-choice loglik")
    alone = "d" if "d" in results else "f" if B == 1 else None  # the shared prompt without the prefix
    if "i" in results and alone in results:
        print(f"(i) vs ({alone}): the template prefix {results['i']['examples_per_s'] / results[alone]['examples_per_s']:.2f}x"
              " the shared prompt alone")

    machine = machine_info()
    report = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "base_model": args.base_model,
        "lora_weights": args.lora_weights,
        "tasks": {t: len(r) for t, r in data.items()},
        "n_examples": n,
        "hardware": {"nproc": machine["cpu_count"], "cpu_model": machine["cpu"], "torch_threads": torch.get_num_threads(),
                     "device": str(next(model.parameters()).device), "dtype": str(next(model.parameters()).dtype),
                     "loadavg_before": load_before, "loadavg_after": os.getloadavg()},
        "versions": {key: machine[key] for key in ("python", "torch", "transformers")},
        "configs": {k: {**{f: v for f, v in r.items() if f != "preds"},
                        "speedup_vs_a": r["examples_per_s"] / base["examples_per_s"]} for k, r in results.items()},
        "differences": diffs,
        "predictions": {k: [results[k]["preds"][key]["pred"] for key in keys] for k in results},
    }
    write_result(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
