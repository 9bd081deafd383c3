"""Answers by generation, as NVlabs/DoRA commonsense_evaluate.py: beam search, then the answer regex.

* prompt: :func:`commonsense.prompts.evaluation_prompt` of the row's instruction
  (the original never passes an input);
* ``GenerationConfig(temperature=0.1, top_p=0.75, top_k=40, num_beams=4)`` with
  ``do_sample=False`` (beam search; temperature/top-p/top-k are inert, kept for the record)
  and ``max_new_tokens=32``;
* the whole sequence is decoded with ``skip_special_tokens=True``, the answer is the text
  after the last "### Response:" (:func:`split_response`), the prediction is the first label
  word in it (:func:`extract_answer`), and ``flag = pred == answer``.

Deliberate differences, none about scoring: batched generation is correct (left padding, an
explicit attention mask, a pad token distinct from EOS where possible; the original passed no
mask, so with ``batch_size > 1`` it attended to pad tokens). transformers 4.36 (the
original's pin) ignored the model's EOS when handed a fresh GenerationConfig, so every beam
ran the full 32 tokens, and so does this by default (``stop_at_eos=False``);
``stop_at_eos=True`` (``--eos_stop``) stops beams at EOS: faster, but under beam search an
early stop can change which beam wins, so it is opt-in.
"""
import copy
import dataclasses

import torch

from commonsense.eval_model import EvaluationError, model_device
from commonsense.prompts import evaluation_prompt, split_response
from commonsense.tasks import extract_answer


@dataclasses.dataclass(frozen=True)
class GenerationSettings:
    """The original's decoding settings; only num_beams and max_new_tokens act under beam search."""

    temperature: float = 0.1
    top_p: float = 0.75
    top_k: int = 40
    num_beams: int = 4
    do_sample: bool = False
    max_new_tokens: int = 32
    stop_at_eos: bool = False  # the original (transformers 4.36): always 32 new tokens; True stops at EOS

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def build_generation_config(model, tokenizer, settings: GenerationSettings):
    """The original's GenerationConfig plus explicit pad/EOS ids.

    Every decoding field is set explicitly so nothing is inherited from the
    model's own generation_config (e.g. a checkpoint that ships do_sample=True).
    """
    from transformers import GenerationConfig

    eos_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else model.config.eos_token_id
    return GenerationConfig(
        temperature=settings.temperature,
        top_p=settings.top_p,
        top_k=settings.top_k,
        num_beams=settings.num_beams,
        do_sample=settings.do_sample,
        num_return_sequences=1,
        repetition_penalty=1.0,
        length_penalty=1.0,
        no_repeat_ngram_size=0,
        early_stopping=False,
        max_new_tokens=settings.max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        # An id past the logits (never generated) disables stopping; None would
        # fall back to the model's EOS.
        eos_token_id=eos_id if settings.stop_at_eos else _never_generated_id(model),
    )


def _never_generated_id(model) -> int:
    return model.get_output_embeddings().weight.shape[0]


def generate_responses(model, tokenizer, instructions, settings: GenerationSettings = None,
                       cache_implementation: str = None) -> list:
    """Answers (text after "### Response:") for a batch of instructions.

    `cache_implementation`: transformers' KV cache kind ("static": preallocated; on CUDA,
    generate then compiles the decoding step). Benchmarked as configuration (j) of
    benchmarks/eval_speed.py; the evaluation itself keeps the default dynamic cache.
    """
    settings = settings or GenerationSettings()
    if tokenizer.padding_side != "left":
        # Right padding would put pad tokens between the prompt and the new tokens.
        raise EvaluationError("batched generation needs tokenizer.padding_side == 'left'")
    prompts = [evaluation_prompt(instruction) for instruction in instructions]
    encoded = tokenizer(prompts, return_tensors="pt", padding=True)
    device = model_device(model)
    config = build_generation_config(model, tokenizer, settings)
    if cache_implementation is not None:
        config.cache_implementation = cache_implementation
    with torch.no_grad():
        sequences = model.generate(
            input_ids=encoded["input_ids"].to(device),
            attention_mask=encoded["attention_mask"].to(device),
            generation_config=config,
        )
    decoded = tokenizer.batch_decode(sequences, skip_special_tokens=True)
    return [split_response(text) for text in decoded]


def score_row(task_name: str, row: dict, response: str) -> dict:
    """Copy of `row` with the original's output_pred / pred / flag fields."""
    pred = extract_answer(task_name, response)
    scored = copy.deepcopy(row)
    scored["output_pred"] = response
    scored["pred"] = pred
    scored["flag"] = row.get("answer") == pred
    return scored

