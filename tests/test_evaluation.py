"""Generation-based evaluation on a tiny random LLaMA: batching, resume, output format, the CLI.

Bad input: tests/test_bad_inputs.py.
"""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from commonsense import evaluation, generation
from commonsense.data import load_rows
from commonsense.eval_log import partial_path
from commonsense.eval_model import EvaluationError, check_adapter_folder, load_model_for_eval, normalize_adapter
from commonsense.evaluation import RunInfo, evaluate_task, evaluate_tasks, resolve_task_names, result_path, summary_path
from commonsense.generation import GenerationSettings, generate_responses
from commonsense.prompts import evaluation_prompt

from tiny_models import build_tiny_llama

REPO_ROOT = Path(__file__).resolve().parent.parent
ORIGINAL_FIELDS = {"instruction", "input", "output", "answer", "output_pred", "pred", "flag"}

INSTRUCTIONS = [
    "Please answer the following question with true or false, question: is the sky blue?",
    "Q?",
    "Please choose the correct ending to complete the given sentence: The cat sat on the mat and then",
    "Which option is right? option1: left option2: right",
    "Say something.",
    "Please choose the correct answer to the question: What do plants need? Answer1: water Answer2: rock",
]


# --------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return load_model_for_eval(str(tiny_dir), adapter="none")


def boolq_rows(n=6):
    return [{"instruction": INSTRUCTIONS[i % len(INSTRUCTIONS)] + f" #{i}", "input": "",
             "output": "the correct answer is true", "answer": ["true", "false"][i % 2]} for i in range(n)]


class WordTokenizer:
    """Stands in for a tokenizer where only prompt lengths are read (batches form by length)."""

    def __call__(self, texts):
        return {"input_ids": [list(range(len(text.split()))) for text in texts]}


WORDS = WordTokenizer()


def answers_true(calls=None, interrupt_at=None):
    """A generate_responses stand-in answering "true", recording each batch's instructions in
    `calls`; its call number `interrupt_at` raises KeyboardInterrupt (a run stopped there)."""
    calls = [] if calls is None else calls

    def generate(model, tokenizer, instructions, settings=None):
        calls.append(instructions)
        if len(calls) == interrupt_at:
            raise KeyboardInterrupt
        return ["true"] * len(instructions)
    return generate


def write_dataset(dataset_dir: Path, task: str, rows) -> None:
    (dataset_dir / task).mkdir(parents=True, exist_ok=True)
    (dataset_dir / task / "test.json").write_text(json.dumps(rows), encoding="utf-8")


# --------------------------------------------------------------------------- generation

def test_model_is_ready_for_batched_generation(tiny):
    model, tokenizer = tiny
    assert tokenizer.padding_side == "left"
    assert tokenizer.pad_token_id == 0 and model.generation_config.pad_token_id == 0
    assert not model.training


def test_batched_generation_matches_batch_of_one(tiny):
    model, tokenizer = tiny
    prompts = INSTRUCTIONS[:4]  # very different lengths -> heavy left padding
    batched = generate_responses(model, tokenizer, prompts)
    one_by_one = [generate_responses(model, tokenizer, [p])[0] for p in prompts]
    assert batched == one_by_one
    assert any(batched)  # the random model does produce text


def test_batches_above_one_take_the_longest_prompts_first():
    assert evaluation.make_batches([5, 9, 1, 9, 4, 7], 1) == [[0], [1], [2], [3], [4], [5]]  # the original's order
    assert evaluation.make_batches([5, 9, 1, 9, 4, 7], 3) == [[1, 3, 5], [0, 4, 2]]  # ties keep input order
    assert evaluation.make_batches([2, 1, 3], 8) == [[2, 0, 1]]
    assert evaluation.make_batches([], 4) == []
    assert evaluation.input_order_batches(7, 3) == [[0, 1, 2], [3, 4, 5], [6]] and evaluation.input_order_batches(0, 2) == []


@pytest.mark.parametrize("mode", ["generate", "loglik"])
def test_length_sorted_batches_give_the_batch_of_one_results(tiny, tmp_path, monkeypatch, mode):
    """The results at batch 4 (rows regrouped by prompt length) equal batch 1's, in input order
    (loglik scores within float rounding), and each batch really was formed longest prompt first."""
    model, tokenizer = tiny
    rows = boolq_rows(11)  # prompts of 2 to 18 words, in no length order
    one = evaluate_task(model, tokenizer, "boolq", rows, 1, tmp_path / "one.json", mode=mode, progress=False)
    seen = []
    scorer = evaluation.score_batch
    monkeypatch.setattr(evaluation, "score_batch", lambda m, t, name, batch, *a: seen.append(batch) or
                        scorer(m, t, name, batch, *a))
    four = evaluate_task(model, tokenizer, "boolq", rows, 4, tmp_path / "four.json", mode=mode, progress=False)
    batched, alone = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("four", "one"))
    if mode == "loglik":  # scores: equal up to float rounding (padding changes the summation order)
        for b, a in zip(batched, alone):
            assert b.pop("scores") == pytest.approx(a.pop("scores"), abs=1e-5)
            assert b.pop("scores_mean") == pytest.approx(a.pop("scores_mean"), abs=1e-5)
    assert batched == alone and four["correct"] == one["correct"]  # text, predictions, flags, input order
    lengths = [len(tokenizer(evaluation_prompt(r["instruction"]))["input_ids"]) for batch in seen for r in batch]
    assert [len(batch) for batch in seen] == [4, 4, 3] and lengths == sorted(lengths, reverse=True)
    assert lengths != [len(tokenizer(evaluation_prompt(r["instruction"]))["input_ids"]) for r in rows]


def test_a_resume_batches_only_the_rows_still_to_score(monkeypatch, tmp_path, capsys):
    """A run at batch 1 stops after 3 rows (input order); the rerun at batch 2 fills every batch with
    rows still to score, longest prompt first, instead of the leftovers of batches over all rows."""
    rows, out = boolq_rows(8), tmp_path / "x.json"
    monkeypatch.setattr(evaluation, "generate_responses", answers_true(interrupt_at=4))
    with pytest.raises(KeyboardInterrupt):
        evaluate_task(None, WORDS, "boolq", rows, 1, out, progress=False)
    capsys.readouterr()
    calls = []
    monkeypatch.setattr(evaluation, "generate_responses", answers_true(calls))
    summary = evaluate_task(None, WORDS, "boolq", rows, 2, out, progress=False)
    assert summary["resumed_examples"] == 3
    assert [len(batch) for batch in calls] == [2, 2, 1]
    lengths = [len(evaluation_prompt(instruction).split()) for batch in calls for instruction in batch]
    assert lengths == sorted(lengths, reverse=True)
    assert sorted(i for batch in calls for i in batch) == sorted(r["instruction"] for r in rows[3:])
    # Numbered after the 2 batches of 2 that the 3 resumed rows fill.
    assert re.findall(r"test:(\d+)/(\d+)", capsys.readouterr().out) == [("3", "5"), ("4", "5"), ("5", "5")]


def test_a_static_kv_cache_generates_the_same_answers(tiny, monkeypatch):
    """benchmarks/eval_speed.py (j): transformers' preallocated cache changes no generated token."""
    model, tokenizer = tiny
    settings = GenerationSettings(max_new_tokens=6)
    caches, generate = [], model.generate
    monkeypatch.setattr(model, "generate", lambda **kw: caches.append(kw["generation_config"].cache_implementation)
                        or generate(**kw))
    static = generate_responses(model, tokenizer, INSTRUCTIONS[:3], settings, cache_implementation="static")
    assert caches == ["static"]
    assert static == generate_responses(model, tokenizer, INSTRUCTIONS[:3], settings) and any(static)


def test_no_eos_stop_generates_full_length(tiny):
    model, tokenizer = tiny
    settings = GenerationSettings(stop_at_eos=False, max_new_tokens=5)
    encoded = tokenizer([evaluation_prompt(INSTRUCTIONS[1])], return_tensors="pt")
    config = generation.build_generation_config(model, tokenizer, settings)
    with torch.no_grad():
        out = model.generate(**encoded, generation_config=config)
    assert out.shape[1] == encoded["input_ids"].shape[1] + 5
    assert config.do_sample is False and config.num_beams == 4


def test_the_original_protocol_is_the_default():
    """Beam search for the full 32 tokens, as the original (transformers 4.36 ignored EOS); the
    command line keeps it unless --eos_stop asks for early stopping."""
    import commonsense_evaluate

    assert GenerationSettings().stop_at_eos is False and GenerationSettings().max_new_tokens == 32
    base = ["--dataset", "boolq", "--model", "LLaMA-7B", "--adapter", "none", "--base_model", "x"]
    assert commonsense_evaluate.parse_args(base).eos_stop is False
    assert commonsense_evaluate.parse_args(base + ["--no_eos_stop"]).eos_stop is False  # older commands
    assert commonsense_evaluate.parse_args(base + ["--eos_stop"]).eos_stop is True
    with pytest.raises(SystemExit):
        commonsense_evaluate.parse_args(base + ["--eos_stop", "--no_eos_stop"])


# --------------------------------------------------------------------------- output format

def test_evaluate_task_writes_original_json_and_summary(tiny, tmp_path):
    model, tokenizer = tiny
    rows = boolq_rows(5)
    out = result_path(tmp_path / "experiment", RunInfo("LLaMA-7B", "DoRA"), "boolq")
    assert out.name == "LLaMA-7B-DoRA-boolq.json"
    summary = evaluate_task(model, tokenizer, "boolq", rows, 2, out, progress=False,
                            run=RunInfo("LLaMA-7B", "DoRA", base_model="base", lora_weights="w"))
    text = out.read_text()
    results = json.loads(text)
    assert text == json.dumps(results, indent=4)  # the original's layout
    assert [set(r) for r in results] == [ORIGINAL_FIELDS] * 5
    assert [r["instruction"] for r in results] == [r["instruction"] for r in rows]
    assert all(r["flag"] == (r["pred"] == r["answer"]) for r in results)
    on_disk = json.loads(summary_path(out).read_text())
    assert on_disk == summary
    assert summary["n"] == 5 and summary["mode"] == "generate" and summary["batch_size"] == 2
    assert summary["correct"] == sum(r["flag"] for r in results)
    assert summary["accuracy"] == summary["correct"] / 5
    assert summary["limit"] is None and summary["base_model"] == "base" and summary["lora_weights"] == "w"
    assert summary["elapsed_s"] >= 0
    assert not partial_path(out).exists()
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name, summary_path(out).name]


def test_flag_follows_extracted_answer(monkeypatch, tmp_path):
    canned = {
        "#0": "the correct answer is true",  # answer true -> correct
        "#1": "the correct answer is true",  # answer false -> wrong
        "#2": "True",  # case-sensitive, as the original: no prediction
        "#3": "false, not true",  # first match wins
    }
    monkeypatch.setattr(evaluation, "generate_responses",
                        lambda model, tok, instructions, settings=None:
                        [canned[i.rsplit(" ", 1)[1]] for i in instructions])
    out = tmp_path / "x.json"
    summary = evaluate_task(None, WORDS, "boolq", boolq_rows(4), 3, out, progress=False)
    results = json.loads(out.read_text())
    assert [r["pred"] for r in results] == ["true", "true", "", "false"]
    assert [r["flag"] for r in results] == [True, False, False, True]
    assert summary["correct"] == 2 and summary["accuracy"] == 0.5


def test_limit_keeps_first_rows(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(evaluation, "generate_responses", lambda m, t, ins, s=None: ["true"] * len(ins))
    summary = evaluate_task(None, WORDS, "boolq", boolq_rows(6), 2, tmp_path / "x.json", limit=3, progress=False)
    assert summary["n"] == 3 and summary["limit"] == 3
    assert len(json.loads((tmp_path / "x.json").read_text())) == 3
    assert "test:2/2 | accuracy 2  0.6666666666666666" in capsys.readouterr().out  # the original's line


def test_bad_batch_size_or_limit(tmp_path):
    with pytest.raises(EvaluationError):
        evaluate_task(None, WORDS, "boolq", boolq_rows(2), 0, tmp_path / "x.json")
    with pytest.raises(EvaluationError):
        evaluate_task(None, WORDS, "boolq", boolq_rows(2), 1, tmp_path / "x.json", limit=0)
    assert not list(tmp_path.iterdir())


# --------------------------------------------------------------------------- resume

def test_partial_log_from_another_run_is_not_reused(monkeypatch, tmp_path):
    monkeypatch.setattr(evaluation, "generate_responses", lambda m, t, ins, s=None: ["false"] * len(ins))
    out = tmp_path / "x.json"
    stale = {"index": 0, "result": {**boolq_rows(1)[0], "output_pred": "true", "pred": "true", "flag": True}}
    partial_path(out).write_text(json.dumps({"header": {"task": "boolq", "base_model": "other"}}) + "\n"
                                 + json.dumps(stale) + "\n")
    summary = evaluate_task(None, WORDS, "boolq", boolq_rows(2), 1, out, progress=False)
    assert summary["resumed_examples"] == 0
    assert [r["pred"] for r in json.loads(out.read_text())] == ["false", "false"]


# --------------------------------------------------------------------------- several tasks, adapters

def test_evaluate_tasks_one_model_several_files(monkeypatch, tmp_path):
    monkeypatch.setattr(evaluation, "generate_responses", lambda m, t, ins, s=None: ["solution1"] * len(ins))
    data = tmp_path / "dataset"
    write_dataset(data, "boolq", boolq_rows(3))
    write_dataset(data, "piqa", [{"instruction": "pick", "input": "", "output": "", "answer": "solution1"}] * 2)
    summaries = evaluate_tasks(None, WORDS, ["piqa", "boolq"], run=RunInfo("SmolLM2-135M", "none"),
                               dataset_dir=data, output_dir=tmp_path / "exp", batch_size=4, progress=False)
    assert [s["dataset"] for s in summaries] == ["piqa", "boolq"]
    assert [s["accuracy"] for s in summaries] == [1.0, 0.0]
    assert (tmp_path / "exp" / "SmolLM2-135M-none-piqa.json").exists()
    assert (tmp_path / "exp" / "SmolLM2-135M-none-boolq.summary.json").exists()


def test_the_whole_run_bar_counts_every_task_and_the_resumed_examples(monkeypatch, tmp_path, capsys):
    """One bar (with an ETA) over all tasks' examples; what resume logs hold counts as done from the start."""
    import re

    import commonsense_evaluate

    data, out = tmp_path / "dataset", tmp_path / "exp"
    write_dataset(data, "boolq", boolq_rows(7))
    write_dataset(data, "piqa", [{"instruction": f"pick #{i}", "input": "", "output": "", "answer": "solution1"}
                                 for i in range(4)])
    run = RunInfo("Qwen2-0.5B", "none")

    # boolq dies in its second batch: 2 examples logged
    monkeypatch.setattr(evaluation, "generate_responses", answers_true(interrupt_at=2))
    with pytest.raises(KeyboardInterrupt):
        evaluate_tasks(None, WORDS, ["boolq", "piqa"], run=run, dataset_dir=data, output_dir=out, batch_size=2,
                       limit=6, progress=False)
    rows = {"boolq": boolq_rows(7), "piqa": json.loads((data / "piqa" / "test.json").read_text())}
    totals = evaluation.run_totals(rows, run=run, output_dir=out, limit=6, settings=GenerationSettings(),
                                   mode="generate")
    assert totals == (6 + 4, 2)
    assert evaluation.run_totals(rows, run=run, output_dir=out, limit=6, settings=GenerationSettings(),
                                 mode="loglik") == (10, 0)  # another mode's log is not this run's
    capsys.readouterr()

    monkeypatch.setattr(evaluation, "generate_responses", lambda m, t, ins, s=None: ["solution1"] * len(ins))
    summaries = evaluate_tasks(None, WORDS, ["boolq", "piqa"], run=run, dataset_dir=data, output_dir=out,
                               batch_size=2, limit=6, progress=True)
    captured = capsys.readouterr()
    counts = re.findall(r"all 2 tasks:\s*\d+%[^|]*\|[^|]*\| (\d+)/(\d+) \[[^<\]]*<", captured.err)
    assert counts[0] == ("2", "10") and counts[-1] == ("10", "10")  # from the resumed 2, with an ETA
    assert [s["resumed_examples"] for s in summaries] == [2, 0]
    assert all(s["examples_per_s"] > 0 for s in summaries)
    assert re.search(r"boolq: accuracy 1/6 = 0\.1667 \(4 examples in [\d.]+ s, [\d.e+]+ examples/s\)", captured.out)
    assert (out / "Qwen2-0.5B-none-piqa.json").is_file()

    commonsense_evaluate.print_table(summaries)
    table = capsys.readouterr().out.splitlines()
    assert table[1].split() == ["task", "n", "correct", "accuracy", "examples/s"]
    assert table[2].split()[:4] == ["BoolQ", "6", "1", "16.7%"] and float(table[2].split()[4]) > 0


def test_model_is_any_plain_name_for_the_file_names():
    import commonsense_evaluate

    base = ["--dataset", "boolq", "--adapter", "none", "--base_model", "x"]
    assert commonsense_evaluate.parse_args(base + ["--model", "Qwen2-0.5B"]).model == "Qwen2-0.5B"
    for name in evaluation.MODEL_NAMES:
        assert commonsense_evaluate.parse_args(base + ["--model", name]).model == name
    for bad in ("../x", "a/b", "a\\b", "", " ", "my model", "x..y"):
        with pytest.raises(EvaluationError, match="is not a plain name"):
            evaluation.check_model_name(bad)


def test_resolve_task_names():
    assert resolve_task_names("all") == list(evaluation.TASK_NAMES)
    assert resolve_task_names("boolq, arc-easy,boolq") == ["boolq", "ARC-Easy"]
    with pytest.raises(EvaluationError, match="unknown dataset 'nope'"):
        resolve_task_names("boolq,nope")


def test_dora_adapter_is_loaded_and_merged(tiny_dir, tmp_path):
    from peft import DoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_dir)
    config = DoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    peft_model = get_peft_model(base, config)
    torch.manual_seed(1)
    with torch.no_grad():  # lora_B starts at zero; make the adapter actually change the output
        for name, param in peft_model.named_parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn_like(param))
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    peft_model.eval()
    ids = torch.tensor([[1, 50, 60, 70, 80]])
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits
        plain = AutoModelForCausalLM.from_pretrained(tiny_dir)(input_ids=ids).logits

    merged, _ = load_model_for_eval(str(tiny_dir), lora_weights=str(tmp_path / "adapter"), adapter="dora")
    assert not isinstance(merged, PeftModel)
    with torch.no_grad():
        got = merged(input_ids=ids).logits
    assert not torch.allclose(expected, plain, atol=1e-4)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------- CLI

def run_cli(*args, cwd=REPO_ROOT):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    return subprocess.run([sys.executable, str(REPO_ROOT / "commonsense_evaluate.py"), *map(str, args)],
                          cwd=cwd, capture_output=True, text=True, timeout=300, env=env)


def test_cli_evaluates_several_tasks(tiny_dir, tmp_path):
    out = tmp_path / "out"
    result = run_cli("--model", "SmolLM2-135M", "--adapter", "NONE", "--dataset", "boolq,piqa",
                     "--base_model", tiny_dir, "--limit", "2", "--batch_size", "2", "--output_dir", out)
    assert result.returncode == 0, result.stderr
    for task in ("boolq", "piqa"):
        results = json.loads((out / f"SmolLM2-135M-none-{task}.json").read_text())
        assert len(results) == 2 and set(results[0]) >= ORIGINAL_FIELDS
        assert json.loads((out / f"SmolLM2-135M-none-{task}.summary.json").read_text())["limit"] == 2
    assert "test finished" in result.stdout and "average" in result.stdout


def test_task_log_dir_gets_each_tasks_output(monkeypatch, tmp_path):
    """The seed scripts' per-task logs (`| tee -a weights/<task>.txt`) from one process."""
    monkeypatch.setattr(evaluation, "generate_responses", lambda model, tok, instructions, settings=None: [
        "the correct answer is true" for _ in instructions])
    dataset_dir = tmp_path / "dataset"
    for task in ("boolq", "winogrande"):
        rows = [dict(r, answer="option1" if task == "winogrande" else r["answer"]) for r in boolq_rows(4)]
        write_dataset(dataset_dir, task, rows)
    logs = tmp_path / "weights"
    evaluate_tasks(None, WORDS, ["boolq", "winogrande"], run=RunInfo(model_name="LLaMA-7B", adapter="DoRA"),
                   dataset_dir=dataset_dir, output_dir=tmp_path / "exp", batch_size=2, progress=False,
                   task_log_dir=logs)
    boolq_log = (logs / "boolq.txt").read_text()
    assert "boolq: accuracy 2/4" in boolq_log and "winogrande" not in boolq_log
    assert "winogrande: accuracy 0/4" in (logs / "winogrande.txt").read_text()


def test_task_log_holds_every_example_as_the_original_printed_it(monkeypatch, tmp_path, capsys):
    """instruction / output / prediction / label for every example, then the running accuracy
    after each batch, in order; the terminal shows only progress lines unless --verbose."""
    outputs = iter(["the correct answer is true", "I think false", "no idea", "the correct answer is false"])
    monkeypatch.setattr(evaluation, "generate_responses", lambda model, tok, instructions, settings=None: [
        next(outputs) for _ in instructions])
    dataset_dir = tmp_path / "dataset"
    rows = boolq_rows(4)
    write_dataset(dataset_dir, "boolq", rows)
    logs = tmp_path / "weights"
    evaluate_tasks(None, WORDS, ["boolq"], run=RunInfo(model_name="LLaMA-7B", adapter="DoRA"),
                   dataset_dir=dataset_dir, output_dir=tmp_path / "exp", batch_size=2, progress=False,
                   task_log_dir=logs)
    log = (logs / "boolq.txt").read_text()
    results = json.loads((tmp_path / "exp" / "LLaMA-7B-DoRA-boolq.json").read_text())
    expected, done = [], []
    # Batches above 1 run longest prompt first: rows 2 (18 words), 0 (16), then 3 (8), 1 (2).
    for batch_number, batch in enumerate(((2, 0), (3, 1)), start=1):
        for i in batch:
            expected += [rows[i]["instruction"], results[i]["output_pred"], f"prediction: {results[i]['pred']}",
                         f"label: {rows[i]['answer']}"]
        done += batch
        correct = sum(results[i]["flag"] for i in done)
        expected.append(f"test:{batch_number}/2 | accuracy {correct}  {correct / len(done)}")
    lines = log.splitlines()
    assert lines[:len(expected)] == expected
    assert f"boolq: accuracy {sum(r['flag'] for r in results)}/4" in log
    assert rows[0]["instruction"] not in capsys.readouterr().out  # not on the terminal without --verbose


def test_cli_sigkill_mid_task_then_rerun_gives_the_uninterrupted_result(tiny, tiny_dir, tmp_path):
    """SIGKILL (no cleanup at all) after the 2nd of 3 batches, then a torn line appended to the log;
    the same command resumes from the log, runs only the unfinished batch, and writes the
    uninterrupted run's result byte for byte."""
    import signal

    def evaluate(out, kill_at=None):
        env = {k: v for k, v in os.environ.items() if k != "DORA_TEST_KILL_AT"}
        env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"},
                   **({"DORA_TEST_KILL_AT": kill_at} if kill_at else {}))
        args = ["--model", "LLaMA-7B", "--adapter", "none", "--dataset", "boolq", "--base_model", tiny_dir,
                "--limit", "6", "--batch_size", "2", "--output_dir", out]
        return subprocess.run([sys.executable, str(REPO_ROOT / "commonsense_evaluate.py"), *map(str, args)],
                              cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)

    model, tokenizer = tiny  # the uninterrupted run, in-process (the CLI loads the model the same way)
    evaluate_tasks(model, tokenizer, ["boolq"], run=RunInfo("LLaMA-7B", "none", base_model=str(tiny_dir)),
                   output_dir=tmp_path / "reference", batch_size=2, limit=6, progress=False)
    out = tmp_path / "killed"
    result = out / "LLaMA-7B-none-boolq.json"
    killed = evaluate(out, kill_at="eval_batch:2")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not result.exists() and not summary_path(result).exists()
    logged = [json.loads(line) for line in partial_path(result).read_text().splitlines()]
    rows = load_rows(REPO_ROOT / "dataset" / "boolq" / "test.json", task="boolq")[:6]
    longest_first = sorted(range(6), key=lambda i: -len(tokenizer(evaluation_prompt(rows[i]["instruction"]))["input_ids"]))
    assert [record["index"] for record in logged[1:]] == longest_first[:4]  # two batches, longest prompts first
    with open(partial_path(result), "a") as log:  # a kill in the middle of a write: a torn last line
        log.write('{"index": %d, "resu' % longest_first[4])

    again = evaluate(out)
    assert again.returncode == 0, again.stderr
    assert "boolq: resuming, 4/6 examples already done" in again.stdout
    assert "test:3/3 |" in again.stdout and "test:2/3 |" not in again.stdout  # only the unfinished batch ran
    assert result.read_text() == (tmp_path / "reference" / result.name).read_text()
    summary = json.loads(summary_path(result).read_text())
    expected = json.loads(summary_path(tmp_path / "reference" / result.name).read_text())
    volatile = ("resumed_examples", "elapsed_s", "examples_per_s", "finished_at")
    assert {k: v for k, v in summary.items() if k not in volatile} == \
        {k: v for k, v in expected.items() if k not in volatile}
    assert summary["resumed_examples"] == 4 and not partial_path(result).exists()


def test_lora_weights_may_be_a_hub_repo_id(tiny_dir, tmp_path, monkeypatch):
    """As the original: --lora_weights org/name downloads the adapter (adapter files only, into the
    hub cache) and evaluates it; offline and not cached, it is one error line."""
    import shutil

    import huggingface_hub
    from transformers import AutoModelForCausalLM

    from peft import DoraConfig, get_peft_model

    source = tmp_path / "published"
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_dir),
                           DoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    model.save_pretrained(str(source))
    asked = []

    def fake_snapshot_download(repo_id, allow_patterns=None, **kwargs):  # the hub, served from `source`
        asked.append((repo_id, tuple(allow_patterns)))
        snapshot = tmp_path / "cache" / repo_id.replace("/", "--")
        shutil.copytree(source, snapshot, dirs_exist_ok=True)
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    folder = check_adapter_folder("some-org/dora-adapter")
    assert (folder / "adapter_config.json").is_file()
    assert asked[0] == ("some-org/dora-adapter", ("adapter_config.json", "adapter_model.safetensors",
                                                   "adapter_model.bin"))
    loaded, _ = load_model_for_eval(str(tiny_dir), lora_weights="some-org/dora-adapter", adapter="DoRA")
    reference, _ = load_model_for_eval(str(tiny_dir), lora_weights=str(source), adapter="DoRA")
    ids = torch.tensor([[1, 5, 9, 13]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, reference(input_ids=ids).logits)


def test_adapter_names_are_case_insensitive():
    assert [normalize_adapter(name) for name in ("dora", "LORA", " None ", "ft")] == ["DoRA", "LoRA", "none", "FT"]
