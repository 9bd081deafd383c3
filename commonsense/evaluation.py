"""Generation-based evaluation, reproducing NVlabs/DoRA commonsense_evaluate.py.

Protocol (as the original):

* prompt: :func:`commonsense.prompts.evaluation_prompt` of the row's instruction
  (the original never passes an input);
* generation: ``GenerationConfig(temperature=0.1, top_p=0.75, top_k=40,
  num_beams=4)`` with ``do_sample=False`` (beam search; temperature/top-p/top-k
  are inert, kept for the record) and ``max_new_tokens=32``;
* the whole sequence is decoded with ``skip_special_tokens=True``, the answer is
  the text after the last "### Response:" (:func:`split_response`), the
  prediction is the first label word in it (:func:`extract_answer`), and
  ``flag = pred == answer``;
* each row is copied with ``output_pred``, ``pred`` and ``flag`` added and the
  list is saved as ``experiment/{model}-{adapter}-{dataset}.json`` (indent=4);
* the adapter is merged into the base weights before evaluating.

Deliberate differences, all about correctness or robustness, none about scoring:

* batched generation is correct: left padding, an explicit attention mask and a
  pad token distinct from EOS where possible (the original passed no mask, so
  with ``batch_size > 1`` it attended to pad tokens);
* none in decoding by default: transformers 4.36 (the original's pin) ignored the
  model's EOS when handed a fresh GenerationConfig, so every beam ran the full 32
  tokens, and so does this by default (``stop_at_eos=False``). ``stop_at_eos=True``
  (``--eos_stop``) stops beams at EOS: faster, but under beam search an early stop
  can change which beam wins, so it is opt-in;
* results are written atomically, finished examples are logged to
  ``{out}.partial.jsonl`` so an interrupted run resumes where it stopped, and a
  small ``{out stem}.summary.json`` records accuracy and run settings.

A second mode, ``mode="loglik"`` (not in the original), ranks the task's answer
continuations ("the correct answer is answerN", :meth:`Task.continuation`) by
their log-likelihood after the same prompt instead of generating; see
:func:`score_choices`. Its files are ``{model}-{adapter}-{dataset}-loglik.json``
(+ ``.summary.json`` with ``"mode": "loglik"``), so both modes can coexist.
"""
import contextlib
import copy
import dataclasses
import os
import re
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from tqdm import tqdm

from commonsense.data import load_rows
from commonsense.io import append_jsonl, atomic_write_json, child_path, kill_point, read_jsonl, tee_stdout
from commonsense.models import configure_padding, load_base_model, load_tokenizer
from commonsense.prompts import evaluation_prompt, split_response
from commonsense.tasks import TASK_NAMES, extract_answer, get_task

REPO_ROOT = Path(__file__).resolve().parent.parent

# FT: a fully fine-tuned model (finetune.py --adapter_name ft), given as --base_model; no adapter.
ADAPTERS = ("LoRA", "DoRA", "FT", "none")
NO_ADAPTER = ("FT", "none")
MODEL_NAMES = ("LLaMA-7B", "LLaMA-13B", "LLaMA2-7B", "LLaMA3-8B", "SmolLM2-135M")
MODE = "generate"  # the summary's "mode": free generation + regex, as the original
LOGLIK = "loglik"  # rank the answer continuations by log-likelihood
MODES = (MODE, LOGLIK)
# Number of answer choices in the data for tasks with a fixed count (the label
# lists allow more, e.g. answer1..5 for SIQA/OBQA, to match the original regex).
# ARC varies (3-5 answers) and is read from each instruction.
FIXED_CHOICES = {"boolq": 2, "piqa": 2, "winogrande": 2, "hellaswag": 4, "social_i_qa": 3, "openbookqa": 4}


class EvaluationError(ValueError):
    """Bad evaluation input (adapter name, adapter folder, output location...); one-line message."""


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


@dataclasses.dataclass(frozen=True)
class RunInfo:
    """What produced a result: names the output files and is recorded in the summary."""

    model_name: str = "model"  # --model, used only in file names (LLaMA-7B, ...)
    adapter: str = "DoRA"
    base_model: str = None
    lora_weights: str = None


# --------------------------------------------------------------------------- names and paths

def normalize_adapter(name: str) -> str:
    """Canonical adapter name (LoRA, DoRA or none) for any capitalisation."""
    canonical = {a.lower(): a for a in ADAPTERS}
    try:
        return canonical[str(name).strip().lower()]
    except KeyError:
        why = ""
        if str(name).strip().lower() in ("adapterp", "adapterh", "parallel"):
            why = " (the original also listed LLM-Adapters' bottleneck adapters, which are not carried here)"
        raise EvaluationError(f"unknown adapter {name!r}; choose from {', '.join(ADAPTERS)}{why}") from None


def resolve_task_names(spec: str) -> list:
    """Task names from "all", one name or a comma list; names match case-insensitively."""
    by_lower = {name.lower(): name for name in TASK_NAMES}
    parts = [part.strip() for part in str(spec).split(",") if part.strip()]
    if not parts:
        raise EvaluationError("no dataset given; use a task name, a comma list or 'all'")
    if [p.lower() for p in parts] == ["all"]:
        return list(TASK_NAMES)
    names = []
    for part in parts:
        if part.lower() not in by_lower:
            raise EvaluationError(f"unknown dataset {part!r}; valid: {', '.join(TASK_NAMES)} or all")
        name = by_lower[part.lower()]
        if name not in names:  # "boolq,boolq" evaluates once
            names.append(name)
    return names


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise EvaluationError(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
    return mode


def result_path(output_dir, run: RunInfo, task_name: str, mode: str = MODE) -> Path:
    """experiment/{model}-{adapter}-{dataset}.json (the original's name); "-loglik" is appended in loglik mode."""
    suffix = "" if check_mode(mode) == MODE else f"-{mode}"
    # The names come from options (or a caller's RunInfo): they must not lead out of output_dir.
    return child_path(output_dir, f"{run.model_name}-{run.adapter}-{task_name}{suffix}.json", "result file name")


def summary_path(out_path) -> Path:
    out_path = Path(out_path)
    return out_path.with_name(out_path.stem + ".summary.json")


def partial_path(out_path) -> Path:
    out_path = Path(out_path)
    return out_path.with_name(out_path.name + ".partial.jsonl")


def dataset_file(dataset_dir, task_name: str) -> Path:
    return Path(dataset_dir) / task_name / "test.json"


# --------------------------------------------------------------------------- model

def _import_peft_model():
    # The vendored fork must win over any pip-installed peft; entry scripts already
    # put it first, this covers library use (e.g. from a notebook).
    from commonsense.cli import add_repo_paths

    add_repo_paths()
    from peft import PeftModel

    return PeftModel


def check_adapter_folder(lora_weights) -> Path:
    """The adapter folder must exist and hold a valid adapter_config.json (checked before loading the base).

    A hub repo id ("org/name", as the original accepted) is downloaded first, adapter files only,
    into the hub cache (the fork's resolve_adapter_dir, which PeftModel.from_pretrained uses too).
    """
    if lora_weights is None or not str(lora_weights).strip():
        raise EvaluationError("--lora_weights is required unless --adapter none")
    folder = Path(lora_weights).expanduser()
    _import_peft_model()
    if not folder.is_dir():
        from peft.utils.hub import looks_like_hub_repo, resolve_adapter_dir

        if not looks_like_hub_repo(str(lora_weights)):
            raise EvaluationError(f"adapter folder not found: {lora_weights}")
        folder = Path(resolve_adapter_dir(str(lora_weights)))
    if not (folder / "adapter_config.json").is_file():
        raise EvaluationError(f"{lora_weights}: not an adapter folder (no adapter_config.json)")
    from peft import PeftConfig

    PeftConfig.from_pretrained(str(folder))  # not JSON, unknown peft_type, bad r...: fail before the base loads
    return folder


def check_adapter_args(adapter, lora_weights) -> str:
    """Canonical adapter name; an adapter needs a folder, "none" and "FT" must not get one."""
    adapter = normalize_adapter(adapter)
    if adapter in NO_ADAPTER:
        if lora_weights:
            # Probably a mistake either way: refuse rather than guess which one was meant.
            hint = " (a fully fine-tuned model is the --base_model folder)" if adapter == "FT" else ""
            raise EvaluationError(f"--lora_weights given with --adapter {adapter}; drop one of them{hint}")
    else:
        check_adapter_folder(lora_weights)
    return adapter


def load_model_for_eval(
    base_model,
    lora_weights=None,
    adapter="DoRA",
    load_8bit=False,
    load_4bit=False,
    device=None,
    dtype="auto",
    trust_remote_code=False,
):
    """Load base model + tokenizer, attach the adapter and merge it; return (model, tokenizer).

    fp16 on CUDA (as the original), fp32 on CPU. The adapter type (LoRA or DoRA)
    comes from adapter_config.json; `adapter` only says whether there is one
    (the original's DoRA eval scripts pass --adapter LoRA for DoRA weights).
    With `load_8bit` / `load_4bit` the adapter is kept unmerged: quantized weights cannot absorb it.
    """
    adapter = check_adapter_args(adapter, lora_weights)
    tokenizer = load_tokenizer(base_model, trust_remote_code=trust_remote_code, padding_side="left")
    model = load_base_model(
        base_model,
        dtype=dtype,
        device=device,
        load_8bit=load_8bit,
        load_4bit=load_4bit,
        trust_remote_code=trust_remote_code,
    )
    if adapter not in NO_ADAPTER:
        PeftModel = _import_peft_model()
        model = PeftModel.from_pretrained(model, str(lora_weights))
        if load_8bit or load_4bit:
            print("quantized base weights: the adapter is kept unmerged")
        else:
            print("Merge LoRA/DoRA weights into the original weights")
            model = model.merge_and_unload()
    configure_padding(tokenizer, model)
    model.eval()
    return model, tokenizer


def _model_device(model) -> torch.device:
    device = getattr(model, "device", None)
    return device if device is not None else next(model.parameters()).device


# --------------------------------------------------------------------------- generation

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


def generate_responses(model, tokenizer, instructions, settings: GenerationSettings = None) -> list:
    """Answers (text after "### Response:") for a batch of instructions."""
    settings = settings or GenerationSettings()
    if tokenizer.padding_side != "left":
        # Right padding would put pad tokens between the prompt and the new tokens.
        raise EvaluationError("batched generation needs tokenizer.padding_side == 'left'")
    prompts = [evaluation_prompt(instruction) for instruction in instructions]
    encoded = tokenizer(prompts, return_tensors="pt", padding=True)
    device = _model_device(model)
    with torch.no_grad():
        sequences = model.generate(
            input_ids=encoded["input_ids"].to(device),
            attention_mask=encoded["attention_mask"].to(device),
            generation_config=build_generation_config(model, tokenizer, settings),
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


# --------------------------------------------------------------------------- log-likelihood scoring

def choice_labels(task_name: str, instruction: str) -> list:
    """The label words that are valid answers for this example.

    Fixed-size tasks use the first FIXED_CHOICES labels; ARC lists 3-5 answers as
    "Answer1: ... Answer5: ..." (and "Answer format: answer1/.../answerN"), so the
    labels whose number appears there are used.
    """
    task = get_task(task_name)
    if task.name in FIXED_CHOICES:
        return list(task.labels[:FIXED_CHOICES[task.name]])
    present = {int(n) for n in re.findall(r"\banswer(\d)\b", instruction, flags=re.IGNORECASE)}
    labels = [label for label in task.labels if int(label[-1]) in present]
    if len(labels) < 2:
        raise EvaluationError(f"{task.name}: cannot find the answer choices in instruction {instruction[:80]!r}")
    return labels


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
    device = _model_device(model)
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


# --------------------------------------------------------------------------- resume log

def _fingerprint(task_name: str, run: RunInfo, settings: GenerationSettings, mode: str = MODE) -> dict:
    # What must match for logged examples to be reused. Batch size and limit are
    # left out on purpose: results do not depend on them (batching is exact).
    return {
        "task": task_name,
        "mode": mode,
        "base_model": None if run.base_model is None else str(run.base_model),
        "lora_weights": None if run.lora_weights is None else str(run.lora_weights),
        "adapter": run.adapter,
        # Decoding settings do not affect loglik scores.
        "generation": settings.to_dict() if mode == MODE else None,
    }


def load_finished(partial: Path, fingerprint: dict, rows: list) -> dict:
    """{index: scored row} from a previous interrupted run, or {} if there is none or it does not match."""
    if not partial.exists():
        return {}
    records = read_jsonl(partial)
    if not records or records[0].get("header") != fingerprint:
        print(f"warning: {partial} is from a different run; starting over", file=sys.stderr)
        return {}
    finished = {}
    for record in records[1:]:
        index, scored = record.get("index"), record.get("result")
        # Same data as now? (the test file could have changed in between)
        if isinstance(index, int) and 0 <= index < len(rows) and isinstance(scored, dict) \
                and scored.get("instruction") == rows[index].get("instruction"):
            finished[index] = scored
    return finished


def _restart_log(partial: Path, fingerprint: dict, finished: dict) -> None:
    # Rewrite instead of appending: drops a torn last line and stale records.
    tmp = partial.with_name(partial.name + ".tmp")
    tmp.unlink(missing_ok=True)
    append_jsonl(tmp, [{"header": fingerprint}] + [{"index": i, "result": r} for i, r in sorted(finished.items())])
    os.replace(tmp, partial)


# --------------------------------------------------------------------------- evaluation loop

def make_batches(n_rows: int, batch_size: int) -> list:
    """Index lists [0..bs), [bs..2bs), ... as the original's create_batch."""
    return [list(range(start, min(start + batch_size, n_rows))) for start in range(0, n_rows, batch_size)]


def evaluate_task(
    model,
    tokenizer,
    task_name,
    rows,
    batch_size,
    out_path,
    *,
    limit=None,
    run: RunInfo = None,
    settings: GenerationSettings = None,
    mode: str = MODE,
    verbose=False,
    progress=True,
    example_log=None,
) -> dict:
    """Evaluate one task; write the result JSON and its summary; return the summary.

    Each example's record as the original printed it (instruction, output, prediction, label)
    goes to stdout with `verbose`, else to the `example_log` stream when there is one (the task
    log the seed scripts keep), so the terminal shows only progress and running accuracy.

    `mode` is "generate" (the original protocol) or "loglik" (:func:`score_choices`;
    `batch_size` then counts examples, each expanded to its choices in one forward).
    `limit` keeps the first N rows. Finished examples are logged to
    `{out_path}.partial.jsonl` after each batch; a rerun with the same run
    settings skips them, and the log is removed once the result JSON is written.
    """
    task = get_task(task_name)
    run = run or RunInfo()
    settings = settings or GenerationSettings()
    check_mode(mode)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise EvaluationError(f"batch_size must be a positive integer, got {batch_size!r}")
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise EvaluationError(f"limit must be a positive integer, got {limit!r}")
    rows = list(rows[:limit]) if limit is not None else list(rows)
    if not rows:
        raise EvaluationError(f"{task.name}: no rows to evaluate")

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    partial = partial_path(out_path)
    fingerprint = _fingerprint(task.name, run, settings, mode)
    finished = load_finished(partial, fingerprint, rows)
    _restart_log(partial, fingerprint, finished)
    if finished:
        print(f"{task.name}: resuming, {len(finished)}/{len(rows)} examples already done")

    started = time.perf_counter()
    batches = make_batches(len(rows), batch_size)
    correct = sum(bool(r["flag"]) for r in finished.values())
    done = resumed = len(finished)
    bar = tqdm(total=len(rows), initial=done, desc=task.name, unit="ex", disable=not progress, file=sys.stderr)
    try:
        for batch_number, indices in enumerate(batches, start=1):
            todo = [i for i in indices if i not in finished]
            if not todo:
                continue
            instructions = [rows[i]["instruction"] for i in todo]
            if mode == LOGLIK:
                scored_rows = [score_row_loglik(task.name, rows[i], scores) for i, scores in
                               zip(todo, score_choices(model, tokenizer, task.name, instructions))]
            else:
                responses = generate_responses(model, tokenizer, instructions, settings)
                scored_rows = [score_row(task.name, rows[i], response) for i, response in zip(todo, responses)]
            new_records = []
            for index, scored in zip(todo, scored_rows):
                response = scored["output_pred"]
                finished[index] = scored
                correct += scored["flag"]
                new_records.append({"index": index, "result": scored})
                if verbose:
                    tqdm.write(example_record(rows[index], response, scored))
                elif example_log is not None:
                    example_log.write(example_record(rows[index], response, scored) + "\n")
            append_jsonl(partial, new_records)
            kill_point("eval_batch", batch_number)  # test-only crash hook (tests/test_evaluation.py)
            done += len(todo)
            bar.update(len(todo))
            # The original's running accuracy line (batch count, correct, fraction).
            tqdm.write(f"test:{batch_number}/{len(batches)} | accuracy {correct}  {correct / done}")
    finally:
        bar.close()

    results = [finished[i] for i in range(len(rows))]
    atomic_write_json(out_path, results, indent=4)
    summary = {
        "model": run.model_name,
        "adapter": run.adapter,
        "dataset": task.name,
        "task": task.display_name,
        "mode": mode,
        "accuracy": correct / len(rows),
        "correct": correct,
        "n": len(rows),
        "limit": limit,
        "batch_size": batch_size,
        "base_model": None if run.base_model is None else str(run.base_model),
        "lora_weights": None if run.lora_weights is None else str(run.lora_weights),
        "generation": settings.to_dict() if mode == MODE else None,
        **({"loglik": {"score": "sum of continuation token log-probs", "continuation": task.answer_template}}
           if mode == LOGLIK else {}),
        "resumed_examples": resumed,
        "elapsed_s": round(time.perf_counter() - started, 3),
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "output_file": out_path.name,
    }
    atomic_write_json(summary_path(out_path), summary, indent=4)
    partial.unlink(missing_ok=True)
    print(f"{task.name}: accuracy {correct}/{len(rows)} = {correct / len(rows):.4f}")
    return summary


def example_record(row: dict, response: str, scored: dict) -> str:
    """One example as the original's evaluation printed it: instruction, output, prediction, label."""
    return f"{row['instruction']}\n{response}\nprediction: {scored['pred']}\nlabel: {row.get('answer')}"


def evaluate_tasks(
    model,
    tokenizer,
    task_names,
    *,
    run: RunInfo,
    dataset_dir=REPO_ROOT / "dataset",
    output_dir="experiment",
    batch_size=1,
    limit=None,
    settings: GenerationSettings = None,
    mode: str = MODE,
    verbose=False,
    progress=True,
    task_log_dir=None,
) -> list:
    """Evaluate several tasks with one loaded model; return their summaries in order.

    All test files are loaded and validated first, so a bad file fails before any
    generation time is spent. With `task_log_dir`, what each task prints is also appended
    to `task_log_dir/<task>.txt` (the original scripts' per-task logs, from one process),
    with every example's record (instruction, output, prediction, label) as the original's.
    """
    names = [get_task(name).name for name in task_names]
    rows_by_task = {name: load_rows(dataset_file(dataset_dir, name), task=name) for name in names}
    summaries = []
    for name in names:
        log = tee_stdout(child_path(task_log_dir, f"{name}.txt", "task log name")) if task_log_dir \
            else contextlib.nullcontext()
        with log as log_file:
            summaries.append(evaluate_task(
                model, tokenizer, name, rows_by_task[name], batch_size, result_path(output_dir, run, name, mode),
                limit=limit, run=run, settings=settings, mode=mode, verbose=verbose, progress=progress,
                example_log=log_file,
            ))
    return summaries
