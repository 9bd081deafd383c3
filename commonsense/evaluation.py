"""Evaluation on the commonsense test sets, reproducing NVlabs/DoRA commonsense_evaluate.py.

One model (:mod:`commonsense.eval_model`) answers each task's rows in batches, by generation
(:mod:`commonsense.generation`, the original protocol) or by log-likelihood ranking
(:mod:`commonsense.loglik`). Each row is copied with ``output_pred``, ``pred`` and ``flag``
added and the list is saved as ``experiment/{model}-{adapter}-{dataset}.json`` (indent=4, the
original's file; ``-loglik`` is appended in that mode), beside a small ``.summary.json`` with
the accuracy and run settings. Results are written atomically, and finished examples go to a
resume log (:mod:`commonsense.eval_log`) so an interrupted run resumes where it stopped.
"""
import contextlib
import dataclasses
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from tqdm import tqdm

from commonsense.data import load_rows
from commonsense.eval_log import fingerprint, load_finished, log_finished, partial_path, restart_log
from commonsense.eval_model import EvaluationError
from commonsense.generation import GenerationSettings, generate_responses, score_row
from commonsense.io import atomic_write_json, child_path, kill_point, tee_stdout
from commonsense.loglik import prompt_prefix, score_choices, score_row_loglik
from commonsense.prompts import evaluation_prompt_ids
from commonsense.tasks import TASK_NAMES, get_task

REPO_ROOT = Path(__file__).resolve().parent.parent

# --model is only a label in file names: any plain name works; these are the ones the scripts use.
MODEL_NAMES = ("LLaMA-7B", "LLaMA-13B", "LLaMA2-7B", "LLaMA3-8B", "SmolLM2-135M")
MODE = "generate"  # the summary's "mode": free generation + regex, as the original
LOGLIK = "loglik"  # rank the answer continuations by log-likelihood
MODES = (MODE, LOGLIK)


@dataclasses.dataclass(frozen=True)
class RunInfo:
    """What produced a result: names the output files and is recorded in the summary."""

    model_name: str = "model"  # --model, used only in file names (LLaMA-7B, ...)
    adapter: str = "DoRA"
    base_model: str = None
    lora_weights: str = None


# --------------------------------------------------------------------------- names and paths

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


def check_model_name(name: str) -> str:
    """A --model label must be a safe part of a file name: no '/', '\\', '..', whitespace, control characters."""
    name = str(name)
    if not name or ".." in name or any(c in name for c in "/\\") or any(c.isspace() or not c.isprintable() for c in name):
        raise EvaluationError(f"model name {name!r} is not a plain name for file names "
                              "(no '/', '\\', '..', spaces or empty; e.g. LLaMA-7B or Qwen2-0.5B)")
    return name


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


def dataset_file(dataset_dir, task_name: str) -> Path:
    return Path(dataset_dir) / task_name / "test.json"


# --------------------------------------------------------------------------- evaluation loop

def check_limit(limit) -> None:
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise EvaluationError(f"limit must be a positive integer, got {limit!r}")


def limited(rows, limit) -> list:
    """The first `limit` rows (all without a limit)."""
    check_limit(limit)
    return list(rows[:limit]) if limit is not None else list(rows)


def resume_header(task_name: str, mode: str, run: "RunInfo", settings: GenerationSettings) -> dict:
    """What a task's resume log must match (decoding settings do not affect loglik scores)."""
    return fingerprint(task_name, mode, run, settings.to_dict() if mode == MODE else None)


def prompt_lengths(tokenizer, instructions, prompt_ids: dict = None) -> list:
    """The token count of each instruction's evaluation prompt (`prompt_ids`: its ids, if the caller has them)."""
    if prompt_ids is None:
        prompt_ids = evaluation_prompt_ids(tokenizer, instructions)
    return [len(prompt_ids[instruction]) for instruction in instructions]


def input_order_batches(n_rows: int, batch_size: int) -> list:
    """Index lists [0..bs), [bs..2bs), ... in input order: the original's create_batch."""
    return [list(range(start, min(start + batch_size, n_rows))) for start in range(0, n_rows, batch_size)]


def make_batches(lengths: list, batch_size: int) -> list:
    """Index lists of at most `batch_size` rows, given each row's prompt length in tokens.

    Batch 1 keeps the input order (:func:`input_order_batches`). Larger batches take the rows
    longest prompt first, so each batch pads little (at batch 8, the padded share of the prompt
    tokens falls from 0.43 to 0.009 on PIQA, from 0.25 to 0.004 on ARC-Challenge) and the
    largest batch runs first, where running out of memory shows at once. Results are exact
    whatever the batch in fp32 (tested), so the order changes no prediction there; in half
    precision any change of a batch's makeup can round differently.
    """
    order = list(range(len(lengths)))
    if batch_size > 1:
        order.sort(key=lambda i: -lengths[i])  # stable: ties keep input order
    return [order[start:start + batch_size] for start in range(0, len(order), batch_size)]


def prompt_batches(tokenizer, instructions, batch_size: int, prompt_ids: dict = None) -> list:
    """:func:`make_batches` of these instructions by their prompts' lengths (`prompt_ids`: their
    ids, if the caller has them). Batch 1 keeps the input order, so it needs no lengths (nor a
    pass of the tokenizer)."""
    if batch_size == 1:
        return input_order_batches(len(instructions), 1)
    return make_batches(prompt_lengths(tokenizer, instructions, prompt_ids), batch_size)


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
    run_bar=None,
) -> dict:
    """Evaluate one task; write the result JSON and its summary; return the summary.

    Each example's record as the original printed it (instruction, output, prediction, label)
    goes to stdout with `verbose`, else to the `example_log` stream when there is one (the task
    log the seed scripts keep), so the terminal shows only progress and running accuracy.
    Records come in the order the batches run: the input order at batch 1, longest prompt
    first above it (:func:`make_batches`); the result JSON is always in input order.

    `mode` is "generate" (the original protocol) or "loglik" (:func:`score_choices`;
    `batch_size` then counts examples; each prompt runs once, its choices' continuations after it).
    `limit` keeps the first N rows. Finished examples are logged to
    `{out_path}.partial.jsonl` after each batch; a rerun with the same run
    settings skips them, and the log is removed once the result JSON is written.
    `run_bar`, the whole run's progress bar (:func:`evaluate_tasks`), advances with each batch.
    """
    task = get_task(task_name)
    run = run or RunInfo()
    settings = settings or GenerationSettings()
    check_mode(mode)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise EvaluationError(f"batch_size must be a positive integer, got {batch_size!r}")
    rows = limited(rows, limit)
    if not rows:
        raise EvaluationError(f"{task.name}: no rows to evaluate")

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    partial = partial_path(out_path)
    header = resume_header(task.name, mode, run, settings)
    generation = header["generation"]
    finished = load_finished(partial, header, rows)
    restart_log(partial, header, finished)
    if finished:
        print(f"{task.name}: resuming, {len(finished)}/{len(rows)} examples already done")

    started = time.perf_counter()
    todo_rows = [i for i in range(len(rows)) if i not in finished]
    todo_instructions = [rows[i]["instruction"] for i in todo_rows]
    # Each prompt is tokenized once, for the batches' lengths and loglik's template prefix.
    prompt_ids = evaluation_prompt_ids(tokenizer, todo_instructions) if batch_size > 1 or mode == LOGLIK else None
    # The template tokens the rows still to score begin with: their KV cache, computed once for this run.
    prefix = prompt_prefix(model, tokenizer, todo_instructions, prompt_ids) if mode == LOGLIK else None
    # Batches of the rows still to score only: a log from another batch size (or batch 1's input
    # order) leaves its rows scattered over batches formed over all rows.
    todo_batches = prompt_batches(tokenizer, todo_instructions, batch_size, prompt_ids)
    batches = [[todo_rows[k] for k in batch] for batch in todo_batches]
    # Numbered after the batches the resumed rows fill: a rerun at the same batch size runs the
    # interrupted run's remaining batches, with their numbers.
    batches_done = -(-len(finished) // batch_size)
    correct = sum(bool(r["flag"]) for r in finished.values())
    done = resumed = len(finished)
    bar = tqdm(total=len(rows), initial=done, desc=task.name, unit="ex", disable=not progress, file=sys.stderr)
    try:
        for batch_number, todo in enumerate(batches, start=batches_done + 1):
            scored_batch = dict(zip(todo, score_batch(model, tokenizer, task.name, [rows[i] for i in todo],
                                                      mode, settings, prefix, prompt_ids)))
            for index, scored in scored_batch.items():
                finished[index] = scored
                correct += scored["flag"]
                if verbose:
                    tqdm.write(example_record(rows[index], scored))
                elif example_log is not None:
                    example_log.write(example_record(rows[index], scored) + "\n")
            log_finished(partial, scored_batch)
            kill_point("eval_batch", batch_number)  # test-only crash hook (tests/test_evaluation.py)
            done += len(todo)
            bar.update(len(todo))
            if run_bar is not None:
                run_bar.update(len(todo))
            # The original's running accuracy line (batch count, correct, fraction).
            tqdm.write(f"test:{batch_number}/{batches_done + len(batches)} | accuracy {correct}  {correct / done}")
    finally:
        bar.close()

    results = [finished[i] for i in range(len(rows))]
    atomic_write_json(out_path, results, indent=4)
    elapsed = time.perf_counter() - started
    speed = (len(rows) - resumed) / elapsed if len(rows) > resumed and elapsed > 0 else None
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
        "generation": generation,
        **({"loglik": {"score": "sum of continuation token log-probs", "continuation": task.answer_template}}
           if mode == LOGLIK else {}),
        "resumed_examples": resumed,
        "elapsed_s": round(elapsed, 3),
        "examples_per_s": None if speed is None else round(speed, 4),  # over the examples this run scored
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "output_file": out_path.name,
    }
    atomic_write_json(summary_path(out_path), summary, indent=4)
    partial.unlink(missing_ok=True)
    print(f"{task.name}: accuracy {correct}/{len(rows)} = {correct / len(rows):.4f} ({speed_note(summary)})")
    return summary


def speed_note(summary: dict) -> str:
    """"12 examples in 3.4 s, 3.53 examples/s" (what this run scored, resumed examples left out)."""
    new = summary["n"] - summary.get("resumed_examples", 0)
    if not summary.get("examples_per_s"):
        return "all examples resumed" if new == 0 else f"{new} examples in {summary['elapsed_s']:.1f} s"
    return f"{new} examples in {summary['elapsed_s']:.1f} s, {summary['examples_per_s']:.3g} examples/s"


def score_batch(model, tokenizer, task_name: str, rows: list, mode: str, settings: GenerationSettings,
                prefix=None, prompt_ids: dict = None) -> list:
    """Each row copied with output_pred, pred and flag (and, in loglik mode, the per-label scores).

    Loglik mode only: `prefix`, the run's :func:`loglik.prompt_prefix` or None; `prompt_ids`, the
    run's :func:`prompts.evaluation_prompt_ids`, so no prompt is tokenized again.
    """
    instructions = [row["instruction"] for row in rows]
    if mode == LOGLIK:
        scores = score_choices(model, tokenizer, task_name, instructions, prefix=prefix, prompt_ids=prompt_ids)
        return [score_row_loglik(task_name, row, row_scores) for row, row_scores in zip(rows, scores)]
    responses = generate_responses(model, tokenizer, instructions, settings)
    return [score_row(task_name, row, response) for row, response in zip(rows, responses)]


def example_record(row: dict, scored: dict) -> str:
    """One example as the original's evaluation printed it: instruction, output, prediction, label."""
    return f"{row['instruction']}\n{scored['output_pred']}\nprediction: {scored['pred']}\nlabel: {row.get('answer')}"


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
    settings = settings or GenerationSettings()
    total, resumed = run_totals(rows_by_task, run=run, output_dir=output_dir, limit=limit, settings=settings, mode=mode)
    # The whole run's bar and ETA (examples over all tasks), above each task's own bar; resumed
    # examples count as done from the start, so the rate and ETA are this run's.
    run_bar = tqdm(total=total, initial=resumed, desc=f"all {len(names)} tasks", unit="ex", position=0,
                   disable=not progress or len(names) < 2, file=sys.stderr)
    summaries = []
    try:
        for name in names:
            log = tee_stdout(child_path(task_log_dir, f"{name}.txt", "task log name")) if task_log_dir \
                else contextlib.nullcontext()
            with log as log_file:
                summaries.append(evaluate_task(
                    model, tokenizer, name, rows_by_task[name], batch_size, result_path(output_dir, run, name, mode),
                    limit=limit, run=run, settings=settings, mode=mode, verbose=verbose, progress=progress,
                    example_log=log_file, run_bar=run_bar,
                ))
    finally:
        run_bar.close()
    return summaries


def run_totals(rows_by_task: dict, *, run: RunInfo, output_dir, limit, settings: GenerationSettings, mode: str):
    """(examples in the whole run, examples its tasks' resume logs already hold), for the run's bar."""
    total = resumed = 0
    for name, rows in rows_by_task.items():
        rows = limited(rows, limit)
        partial = partial_path(result_path(output_dir, run, name, mode))
        total += len(rows)
        resumed += len(load_finished(partial, resume_header(name, mode, run, settings), rows, warn=False))
    return total, resumed
