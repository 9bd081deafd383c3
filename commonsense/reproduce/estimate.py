"""The dry run's measurement: a few training micro-batches and evaluation batches, timed in-process.

The base model loads once. Training: forward + backward of micro-batches with a DoRA adapter
(after one warm-up), as long as the data's micro-batches are padded on average (their
longest row, within the recipe's cutoff, measured on a sample of the training rows); an
optimizer step is that times the gradient accumulation. Evaluation: the evaluation's own
functions on the first rows of each test set, with the adapter disabled (a merged adapter
costs what the base model costs). Seconds per step and per example: an estimate, not a benchmark.
"""
from __future__ import annotations

import json
import math
import random
import time

from commonsense import recipe
from commonsense.reproduce.plan import REPO_ROOT, task_names

TIMED_MICRO_BATCHES = 2
TIMING_RANK = 16
SAMPLED_ROWS = 256


def count_test_rows(dataset_dir=REPO_ROOT / "dataset") -> dict:
    """Rows per test set (the evaluation's dataset/<task>/test.json)."""
    return {task: len(read_test_set(task, dataset_dir)) for task in task_names()}


def read_test_set(task: str, dataset_dir=REPO_ROOT / "dataset") -> list:
    return json.loads((dataset_dir / task / "test.json").read_text(encoding="utf-8"))


def _timed(function, cuda: bool) -> float:
    import torch

    if cuda:
        torch.cuda.synchronize()
    started = time.perf_counter()
    function()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - started


def padded_length(tokenizer, rows: list, micro_batch_size: int) -> int:
    """The mean length micro-batches of these rows are padded to: their longest tokenized training
    prompt (cut at the recipe's cutoff, plus EOS), rounded up to a multiple of 8 as the collator pads."""
    from commonsense.prompts import training_prompt

    rows = random.Random(0).sample(rows, min(SAMPLED_ROWS, len(rows)))
    lengths = [min(recipe.CUTOFF_LEN, len(tokenizer(training_prompt(row))["input_ids"]) + 1) for row in rows]
    batches = [lengths[i:i + micro_batch_size] for i in range(0, len(lengths), micro_batch_size)]
    return round(sum(8 * math.ceil(max(batch) / 8) for batch in batches) / len(batches))


def measure_timing(base_model: str, modes, micro_batch_size: int, eval_batch_size: int, train_rows: list) -> dict:
    """{"step_s", "<mode>_example_s", "device", "rank", "length"} measured on this machine's first device."""
    import torch

    from commonsense.models import configure_padding, load_base_model, load_tokenizer, pick_device
    from peft import DoraConfig, get_peft_model

    device = pick_device()
    cuda = device == "cuda"
    model = load_base_model(base_model)
    tokenizer = load_tokenizer(base_model, padding_side="left")
    configure_padding(tokenizer, model)
    config = DoraConfig(r=TIMING_RANK, lora_alpha=recipe.lora_alpha(TIMING_RANK), lora_dropout=recipe.LORA_DROPOUT,
                        target_modules=recipe.TARGET_MODULES, bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(model, config)

    length = padded_length(tokenizer, train_rows, micro_batch_size)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, tokenizer.vocab_size, (micro_batch_size, length), generator=generator).to(device)

    def micro_batch():
        with torch.autocast("cuda", dtype=torch.float16, enabled=cuda):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()

    model.train()
    micro_batch()  # warm-up: allocations, kernel choice (on a CPU too: its first step ran up to 1.6x slower)
    micro_s = sum(_timed(micro_batch, cuda) for _ in range(TIMED_MICRO_BATCHES)) / TIMED_MICRO_BATCHES
    model.zero_grad(set_to_none=True)
    timing = {"step_s": micro_s * recipe.BATCH_SIZE / micro_batch_size, "rank": TIMING_RANK, "length": length,
              "device": torch.cuda.get_device_name(0) if cuda else f"the CPU ({torch.get_num_threads()} threads)"}

    model.eval()
    with model.disable_adapter():  # the base weights only: what a merged adapter costs
        base = model.get_base_model()
        for mode in modes:
            timing[f"{mode}_example_s"] = _eval_example_seconds(base, tokenizer, mode, eval_batch_size, cuda)
    return timing


def _eval_example_seconds(model, tokenizer, mode: str, batch_size: int, cuda: bool) -> float:
    """Seconds per example: a batch of each test set's first rows (loglik), or one batch mixing the
    test sets' first rows (generate, beams stopped at EOS as the grid evaluates). Batches of the
    evaluation's size: smaller ones cost more per example."""
    from commonsense.generation import GenerationSettings, generate_responses
    from commonsense.loglik import score_choices

    firsts = {task: [row["instruction"] for row in read_test_set(task)[:batch_size]] for task in task_names()}
    if mode == "loglik":
        if cuda:
            score_choices(model, tokenizer, "piqa", firsts["piqa"][:1])  # warm-up
        seconds = sum(_timed(lambda: score_choices(model, tokenizer, task, texts), cuda)
                      for task, texts in firsts.items())
        return seconds / sum(len(texts) for texts in firsts.values())
    mixed = [texts[i] for i in range(batch_size) for texts in firsts.values() if i < len(texts)][:batch_size]
    seconds = _timed(lambda: generate_responses(model, tokenizer, mixed, GenerationSettings(stop_at_eos=True)), cuda)
    return seconds / len(mixed)
