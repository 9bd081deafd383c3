"""Would caching the evaluation template's shared prefix pay for loglik? (issue 17)

Times the prompt forward of each example's shared prompt (commonsense.loglik.choice_sequences)
whole, and after a KV cache of the template prefix that every prompt shares (built outside
the timing, as a cache kept across calls would be). Batch 1, SmolLM2 by default.

    python benchmarks/loglik_prefix.py [--tasks piqa,openbookqa] [--limit 16] [--threads 1]
"""
import argparse
import os
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "peft" / "src"))
sys.path.insert(1, str(REPO_ROOT))

import torch  # noqa: E402

from commonsense.data import load_rows  # noqa: E402
from commonsense.eval_model import load_model_for_eval  # noqa: E402
from commonsense.evaluation import dataset_file, resolve_task_names  # noqa: E402
from commonsense.loglik import choice_sequences  # noqa: E402
from commonsense.tasks import get_task  # noqa: E402


def common_prefix_length(sequences) -> int:
    first = sequences[0]
    return min(next((k for k in range(min(len(first), len(s))) if s[k] != first[k]), min(len(first), len(s)))
               for s in sequences)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base_model", default="smollm2-135m")
    parser.add_argument("--tasks", default="piqa,openbookqa")
    parser.add_argument("--limit", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--dataset_dir", default=str(REPO_ROOT / "dataset"))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model_for_eval(args.base_model, adapter="none")
    print(f"load average before {os.getloadavg()}")
    for task in resolve_task_names(args.tasks):
        rows = load_rows(dataset_file(args.dataset_dir, task), task=task)[:args.limit]
        prompts = [choice_sequences(tokenizer, get_task(task), row["instruction"])[0] for row in rows]
        prefix = common_prefix_length(prompts)
        whole = after_prefix = 0.0
        for _ in range(args.rounds):
            for ids in (torch.tensor([p]) for p in prompts):
                with torch.no_grad():
                    started = time.perf_counter()
                    model(input_ids=ids, use_cache=True, logits_to_keep=1)
                    whole += time.perf_counter() - started
                    cache = model(input_ids=ids[:, :prefix], use_cache=True, logits_to_keep=1).cache
                    started = time.perf_counter()
                    model(input_ids=ids[:, prefix:], position_ids=torch.arange(prefix, ids.shape[1])[None],
                          cache=cache, use_cache=True, logits_to_keep=1)
                    after_prefix += time.perf_counter() - started
        mean = sum(map(len, prompts)) / len(prompts)
        print(f"{task}: shared prefix {prefix} of {mean:.0f} tokens on average; prompt forwards "
              f"whole {whole:.2f} s, after the cached prefix {after_prefix:.2f} s ({after_prefix / whole:.2f}x)")
    print(f"load average after {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
