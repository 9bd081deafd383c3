"""The per-choice log-likelihood scorer that ``commonsense.loglik`` used before the shared prompt.

Every (instruction x choice) sequence -- the whole prompt plus one continuation -- goes
through one left-padded forward. It is the reference the shared-prompt scorer must match
(tests/test_loglik.py) and the "old loglik" row of benchmarks/eval_speed.py.
"""
import torch

from commonsense.eval_model import model_device
from commonsense.loglik import choice_labels, continuation_ids
from commonsense.prompts import evaluation_prompt
from commonsense.tasks import get_task


def score_choices_per_choice(model, tokenizer, task_name: str, instructions) -> list:
    """Per instruction ``{label: {"sum", "mean", "tokens"}}``, as ``loglik.score_choices`` returns."""
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
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    keep = max(len(ids) - start for _, _, ids, start in items) + 1  # position t predicts token t+1
    device = model_device(model)
    with torch.no_grad():
        logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                       position_ids=positions.to(device), logits_to_keep=keep).logits
    logprobs = torch.log_softmax(logits[:, -keep:].float()[:, :-1], dim=-1)
    targets = input_ids[:, width - keep + 1:].to(logprobs.device)
    token_logprobs = logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1).cpu()
    results = [{} for _ in instructions]
    for row, (i, label, ids, start) in enumerate(items):
        n = len(ids) - start
        total = float(token_logprobs[row, -n:].sum())
        results[i][label] = {"sum": total, "mean": total / n, "tokens": n}
    return results
