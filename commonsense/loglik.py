"""Answers by log-likelihood (``--mode loglik``, not in the original): rank the answer continuations.

Each valid label's continuation ("the correct answer is answerN", :meth:`Task.continuation`)
is scored by its summed log-probability after the evaluation prompt, and the best one is the
prediction. Result files end in ``-loglik.json`` (summary ``"mode": "loglik"``), so both
modes' files can sit side by side.
"""
import copy
import re

import torch

from commonsense.eval_model import EvaluationError, model_device
from commonsense.prompts import evaluation_prompt
from commonsense.tasks import answer_options, get_task

def choice_labels(task_name: str, instruction: str) -> list:
    """The label words that are valid answers for this example (:func:`tasks.answer_options`)."""
    try:
        return answer_options(task_name, instruction)
    except ValueError as error:
        raise EvaluationError(str(error)) from None


def continuation_ids(tokenizer, prompt: str, continuation: str):
    """(token ids of prompt+continuation, index of the first continuation token).

    The concatenated text is tokenized as a whole (that is what the model saw in
    training) and the boundary comes from tokenizing the prompt alone. If the
    prompt's tokens are not a prefix of the whole (a merge across the boundary,
    e.g. the prompt's trailing space joining "the"), scoring starts at the first
    differing token; that token's text is the same for all choices, so the
    ranking by summed log-probability is unaffected.
    """
    full = tokenizer(prompt + continuation)["input_ids"]
    head = tokenizer(prompt)["input_ids"]
    start = 0
    while start < min(len(head), len(full) - 1) and head[start] == full[start]:
        start += 1
    # At least one token must precede the scored ones (it predicts the first).
    return list(full), max(start, 1)


def _supports_logits_to_keep(model) -> bool:
    import inspect

    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def score_choices(model, tokenizer, task_name: str, instructions) -> list:
    """Log-likelihood of each valid answer continuation, for a batch of instructions.

    Returns, per instruction, ``{label: {"sum": float, "mean": float, "tokens": int}}``
    where "sum" is the summed log-probability of the continuation tokens given the
    evaluation prompt and "mean" that sum per token. Predictions use the **sum**:
    all continuations share "the correct answer is ", so only the label tokens
    differ and a per-token mean would just dilute the difference by a constant-ish
    length.

    All (instruction x choice) sequences go through one forward pass, left-padded
    (pad = tokenizer.pad_token_id) with an attention mask and explicit position ids,
    so padding does not change the scores. Left padding aligns the sequence ends,
    where the continuations are, so only the last few positions need logits.
    """
    task = get_task(task_name)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    items = []  # (instruction index, label, ids, start)
    for i, instruction in enumerate(instructions):
        prompt = evaluation_prompt(instruction)
        for label in choice_labels(task.name, instruction):
            ids, start = continuation_ids(tokenizer, prompt, task.continuation(label))
            items.append((i, label, ids, start))
    width = max(len(ids) for _, _, ids, _ in items)
    input_ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for row, (_, _, ids, _) in enumerate(items):
        input_ids[row, width - len(ids):] = torch.tensor(ids)
        mask[row, width - len(ids):] = 1
    # Positions count real tokens only, so a padded sequence sees the same positions as unpadded.
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    # Logits are needed for the last `keep` positions only: position t predicts token t+1.
    keep = max(len(ids) - start for _, _, ids, start in items) + 1
    device = model_device(model)
    kwargs = {"logits_to_keep": keep} if _supports_logits_to_keep(model) else {}
    with torch.no_grad():
        logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                       position_ids=positions.to(device), **kwargs).logits
    logits = logits[:, -keep:].float()  # fp32 log_softmax even for fp16 models
    logprobs = torch.log_softmax(logits[:, :-1], dim=-1)  # predicts the last keep-1 tokens
    targets = input_ids[:, width - keep + 1:].to(logprobs.device)
    token_logprobs = logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1).cpu()
    results = [{} for _ in instructions]
    for row, (i, label, ids, start) in enumerate(items):
        n = len(ids) - start
        total = float(token_logprobs[row, -n:].sum())
        results[i][label] = {"sum": total, "mean": total / n, "tokens": n}
    return results


def score_row_loglik(task_name: str, row: dict, scores: dict) -> dict:
    """Copy of `row` with output_pred (chosen continuation), pred, flag and the per-label scores."""
    task = get_task(task_name)
    pred = max(scores, key=lambda label: scores[label]["sum"])  # ties: first label wins
    scored = copy.deepcopy(row)
    scored["output_pred"] = task.continuation(pred)
    scored["pred"] = pred
    scored["flag"] = row.get("answer") == pred
    scored["scores"] = {label: s["sum"] for label, s in scores.items()}
    scored["scores_mean"] = {label: s["mean"] for label, s in scores.items()}
    return scored

