"""Answers by log-likelihood (``--mode loglik``, not in the original): rank the answer continuations.

Each valid label's continuation ("the correct answer is answerN", :meth:`Task.continuation`)
is scored by its summed log-probability after the evaluation prompt, and the best one is the
prediction. Result files end in ``-loglik.json`` (summary ``"mode": "loglik"``), so both
modes' files can sit side by side.

Each prompt runs once for all its choices (:func:`score_choices`). An evaluation run also
computes, once, the KV cache of the template tokens that all its prompts begin with
(:func:`prompt_prefix`), so each prompt's forward runs only the tokens after them.
"""
import copy
import dataclasses
import inspect

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from commonsense.eval_model import EvaluationError, model_device
from commonsense.prompts import evaluation_prompt, evaluation_prompt_ids
from commonsense.tasks import answer_options, get_task


def choice_labels(task_name: str, instruction: str) -> list:
    """The label words that are valid answers for this example (:func:`tasks.answer_options`)."""
    try:
        return answer_options(task_name, instruction)
    except ValueError as error:
        raise EvaluationError(str(error)) from None


def continuation_ids(tokenizer, prompt: str, continuation: str, prompt_ids=None):
    """(token ids of prompt+continuation, index of the first continuation token).

    The concatenated text is tokenized as a whole (that is what the model saw in
    training) and the boundary comes from tokenizing the prompt alone. If the
    prompt's tokens are not a prefix of the whole (a merge across the boundary,
    e.g. the prompt's trailing space joining "the"), scoring starts at the first
    differing token; that token's text is the same for all choices, so the
    ranking by summed log-probability is unaffected. ``prompt_ids``: the prompt's own
    tokenization when the caller has it (one prompt, several continuations).
    """
    full = tokenizer(prompt + continuation)["input_ids"]
    head = tokenizer(prompt)["input_ids"] if prompt_ids is None else prompt_ids
    start = 0
    while start < min(len(head), len(full) - 1) and head[start] == full[start]:
        start += 1
    # At least one token must precede the scored ones (it predicts the first).
    return list(full), max(start, 1)


def _forward_parameters(model) -> set:
    # A peft wrapper (a quantized base keeps its adapter unmerged) passes kwargs through to its base.
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        return set(inspect.signature(base.forward).parameters)
    except (TypeError, ValueError):
        return set()


def _supports_logits_to_keep(model) -> bool:
    return "logits_to_keep" in _forward_parameters(model)


def choice_sequences(tokenizer, task, instruction: str, prompt_ids=None):
    """(shared ids, [(label, tail ids, scored token count)]) for one instruction.

    Each choice's sequence is :func:`continuation_ids`' whole tokenization, scored from the
    same token as there. The shared part is the longest common prefix of the choices'
    sequences, cut so that every tail still begins with the token before its first scored
    one (that token's output predicts it): shared + tail is each choice's full sequence.
    ``prompt_ids``: the prompt's tokenization when the caller already has it.
    """
    prompt = evaluation_prompt(instruction)
    if prompt_ids is None:
        prompt_ids = tokenizer(prompt)["input_ids"]
    choices = []
    for label in choice_labels(task.name, instruction):
        ids, start = continuation_ids(tokenizer, prompt, task.continuation(label), prompt_ids)
        choices.append((label, ids, start))
    first = choices[0][1]
    shared = min(start for _, _, start in choices) - 1
    for _, ids, _ in choices[1:]:
        shared = next((k for k in range(shared) if ids[k] != first[k]), shared)
    if shared < 1:
        raise EvaluationError("loglik: the answer choices share no prompt tokens")
    return first[:shared], [(label, ids[shared:], len(ids) - start) for label, ids, start in choices]


# On a CPU a padded token costs as much as a real one, and batching saves little; on an
# accelerator a wider batch is nearly free. So on a CPU the prompts of a batch are split into
# groups of similar length whose padding stays under this fraction of their real tokens.
CPU_PADDING_SLACK = 0.1


def length_groups(lengths, slack):
    """Indices grouped by descending length so that each group's padding <= slack x its tokens."""
    groups = []
    for index in sorted(range(len(lengths)), key=lambda k: -lengths[k]):
        group = groups[-1] if groups else None
        if group is not None:
            real = sum(lengths[k] for k in group) + lengths[index]
            if (len(group) + 1) * lengths[group[0]] <= (1 + slack) * real:
                group.append(index)
                continue
        groups.append([index])
    return groups


# A shorter common prefix saves too little to pay for its cache copy per batch.
MIN_PREFIX_TOKENS = 4


@dataclasses.dataclass(frozen=True)
class PromptPrefix:
    """The token ids that all prompts of one evaluation run begin with, and their KV cache.

    It holds the model's keys and values for these weights: it belongs to the one run that
    built it (:func:`prompt_prefix`) and is passed to :func:`score_choices` explicitly.
    """

    ids: tuple
    layers: tuple  # per decoder layer (keys, values) at batch 1; read, never written

    def cache(self, batch_size: int) -> DynamicCache:
        """A new cache holding the prefix for each of `batch_size` rows.

        The forwards extend a cache in place; DynamicLayer.update concatenates into new
        tensors, so the stored ones stay as they are.
        """
        return DynamicCache(ddp_cache_data=[(keys.expand(batch_size, -1, -1, -1), values.expand(batch_size, -1, -1, -1))
                                            for keys, values in self.layers])


def prompt_prefix(model, tokenizer, instructions, prompt_ids: dict = None):
    """The :class:`PromptPrefix` of these instructions' evaluation prompts, or None.

    ``prompt_ids``: the prompts' :func:`~commonsense.prompts.evaluation_prompt_ids` when the
    caller already has them.

    The prefix is their prompts' longest common token prefix, cut to leave each prompt two
    tokens of its own (a prompt's shared part, :func:`choice_sequences`, ends a token or more
    before the prompt and must keep one after the prefix; :func:`score_choices` checks that
    it does). None where the prefix is under MIN_PREFIX_TOKENS, or the
    model's forward does not take position ids and a cache of plain dynamic layers (a sliding
    window, say): scoring then runs whole prompts, as without a prefix.
    """
    if not instructions or not {"position_ids", "cache"} <= _forward_parameters(model):
        return None
    if prompt_ids is None:
        prompt_ids = evaluation_prompt_ids(tokenizer, instructions)
    first, *others = prompt_ids.values()
    length = min(len(ids) for ids in prompt_ids.values()) - 2
    for ids in others:
        length = next((k for k in range(length) if ids[k] != first[k]), length)
    if length < MIN_PREFIX_TOKENS:
        return None
    ids = tuple(first[:length])
    device = model_device(model)
    keep_one = {"logits_to_keep": 1} if _supports_logits_to_keep(model) else {}
    with torch.no_grad():
        cache = model(input_ids=torch.tensor([ids], device=device),
                      position_ids=torch.arange(length, device=device)[None], use_cache=True, **keep_one).cache
    if not isinstance(cache, DynamicCache) or any(type(layer) is not DynamicLayer for layer in cache.layers):
        return None
    return PromptPrefix(ids, tuple((layer.keys, layer.values) for layer in cache.layers))


def score_choices(model, tokenizer, task_name: str, instructions, prefix: PromptPrefix = None,
                  prompt_ids: dict = None) -> list:
    """Log-likelihood of each valid answer continuation, for a batch of instructions.

    Returns, per instruction, ``{label: {"sum": float, "mean": float, "tokens": int}}``
    where "sum" is the summed log-probability of the continuation tokens given the
    evaluation prompt and "mean" that sum per token. Predictions use the **sum**:
    all continuations share "the correct answer is ", so only the label tokens
    differ and a per-token mean would just dilute the difference by a constant-ish
    length.

    Each instruction's prompt runs once, not once per choice (:func:`_score_group`), and
    with a `prefix` (:func:`prompt_prefix`) only its tokens after the prefix run. The scores
    equal a separate unpadded forward of each whole sequence up to float rounding, whatever
    the batch, its grouping and the prefix. ``prompt_ids``: the prompts'
    :func:`~commonsense.prompts.evaluation_prompt_ids` when the caller already has them.
    """
    task = get_task(task_name)
    known = prompt_ids or {}
    examples = [choice_sequences(tokenizer, task, instruction, known.get(instruction)) for instruction in instructions]
    if prefix is not None and not all(len(shared) > len(prefix.ids) and tuple(shared[:len(prefix.ids)]) == prefix.ids
                                      for shared, _ in examples):
        prefix = None  # an instruction the prefix was not built for: whole prompts
    skipped = len(prefix.ids) if prefix is not None else 0
    if model_device(model).type == "cpu":
        groups = length_groups([len(shared) - skipped for shared, _ in examples], CPU_PADDING_SLACK)
    else:
        groups = [list(range(len(examples)))]
    results = [None] * len(examples)
    for group in groups:
        for index, scores in zip(group, _score_group(model, tokenizer, [examples[k] for k in group], prefix)):
            results[index] = scores
    return results


def _score_group(model, tokenizer, examples, prefix: PromptPrefix = None) -> list:
    """Scores for :func:`choice_sequences` outputs, in two forwards.

    The shared prompts run once, left-padded, keeping their KV cache; the cache is repeated
    per choice and all choices' short tails run in one right-padded forward on top of it.
    With a `prefix`, the prompts' forward starts from its cache and runs only their tokens
    after it, padded between the two. Attention masks and explicit position ids keep padding
    out of the scores.
    """
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = model_device(model)
    keep_one = {"logits_to_keep": 1} if _supports_logits_to_keep(model) else {}
    skipped = len(prefix.ids) if prefix is not None else 0

    width = max(len(shared) for shared, _ in examples) - skipped
    prompt_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    own_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, (shared, _) in enumerate(examples):
        prompt_ids[i, width - len(shared) + skipped:] = torch.tensor(shared[skipped:])
        own_mask[i, width - len(shared) + skipped:] = 1
    # Positions count real tokens only, so a padded sequence sees the same positions as unpadded.
    prompt_positions = skipped + (own_mask.cumsum(-1) - 1).clamp(min=0)
    prompt_mask = torch.cat([torch.ones((len(examples), skipped), dtype=torch.long), own_mask], dim=1)
    prefix_cache = {"cache": prefix.cache(len(examples))} if prefix is not None else {}

    owners = [i for i, (_, choices) in enumerate(examples) for _ in choices]  # tail row -> example
    tails = [(tail, n) for _, choices in examples for _, tail, n in choices]
    tail_width = max(len(tail) for tail, _ in tails)
    tail_ids = torch.full((len(tails), tail_width), pad_id, dtype=torch.long)
    tail_mask = torch.zeros((len(tails), tail_width), dtype=torch.long)
    for row, (tail, _) in enumerate(tails):
        tail_ids[row, :len(tail)] = torch.tensor(tail)
        tail_mask[row, :len(tail)] = 1
    shared_lengths = torch.tensor([len(examples[i][0]) for i in owners])
    tail_positions = shared_lengths[:, None] + torch.arange(tail_width)
    owner_index = torch.tensor(owners)

    with torch.no_grad():
        cache = model(input_ids=prompt_ids.to(device), attention_mask=prompt_mask.to(device),
                      position_ids=prompt_positions.to(device), use_cache=True, **prefix_cache, **keep_one).cache
        cache.batch_select_indices(owner_index.to(device))
        mask = torch.cat([prompt_mask[owner_index], tail_mask], dim=1)
        logits = model(input_ids=tail_ids.to(device), attention_mask=mask.to(device),
                       position_ids=tail_positions.to(device), cache=cache, use_cache=True).logits
    logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # fp32 even for fp16 models
    # Output t of a tail predicts its token t+1.
    token_logprobs = logprobs.gather(-1, tail_ids[:, 1:].unsqueeze(-1).to(logprobs.device)).squeeze(-1).cpu()
    results = [{} for _ in examples]
    row = 0
    for i, (_, choices) in enumerate(examples):
        for label, tail, n in choices:
            total = float(token_logprobs[row, len(tail) - 1 - n:len(tail) - 1].sum())
            results[i][label] = {"sum": total, "mean": total / n, "tokens": n}
            row += 1
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

