"""finetune.py / commonsense.training on a tiny random LLaMA: recipe details, outputs, warm start.

Bad options: tests/test_bad_inputs.py; resuming a killed run bit for bit: tests/test_crash_safety.py.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from commonsense.train_options import FinetuneError, check_batch_sizes, parse_module_list
from commonsense.training import build_datasets, tokenize_row
from tiny_models import build_tiny_llama

REPO_ROOT = Path(__file__).resolve().parent.parent
SEED_TARGETS = '["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]'


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="module")
def tokenizer(tiny_dir):
    from commonsense.models import load_tokenizer

    return load_tokenizer(str(tiny_dir))


def rows(n=24):
    answers = ["true", "false"]
    return [
        {"instruction": f"Question {i}: is {i} even? Answer format: true/false", "input": "",
         "output": f"the correct answer is {answers[i % 2]}", "answer": answers[i % 2]}
        for i in range(n)
    ]


def write_rows(path: Path, n=24) -> Path:
    path.write_text(json.dumps(rows(n), indent=4))
    return path


# ---- recipe details -------------------------------------------------------------------------
def test_eos_appended_and_labels_are_input_ids(tokenizer):
    example = tokenize_row(tokenizer, rows(1)[0], cutoff_len=512, train_on_inputs=True)
    assert example["input_ids"][-1] == tokenizer.eos_token_id
    assert example["labels"] == example["input_ids"]
    assert example["input_ids"][0] == tokenizer.bos_token_id


def test_truncated_prompt_gets_no_eos(tokenizer):
    example = tokenize_row(tokenizer, rows(1)[0], cutoff_len=20, train_on_inputs=True)
    assert len(example["input_ids"]) == 20
    assert example["input_ids"][-1] != tokenizer.eos_token_id
    assert not example["response_kept"]


def test_train_on_inputs_false_masks_the_prompt(tokenizer):
    from commonsense.prompts import user_prompt

    row = rows(1)[0]
    example = tokenize_row(tokenizer, row, cutoff_len=512, train_on_inputs=False)
    prompt_len = len(tokenizer(user_prompt(row))["input_ids"])
    assert example["labels"][:prompt_len] == [-100] * prompt_len
    assert example["labels"][prompt_len:] == example["input_ids"][prompt_len:]
    decoded = tokenizer.decode(example["input_ids"][prompt_len:], skip_special_tokens=True)
    assert decoded.strip() == row["output"]


@pytest.mark.parametrize(
    "value,expected",
    [
        (SEED_TARGETS, ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]),
        (["q_proj", "v_proj"], ["q_proj", "v_proj"]),
        ("q_proj,v_proj", ["q_proj", "v_proj"]),
        ("q_proj", ["q_proj"]),  # one name, not a regular expression that matches no full module path
        (r".*\.(q|v)_proj", r".*\.(q|v)_proj"),
        (None, None),
        ("", None),
    ],
)
def test_parse_module_list(value, expected):
    assert parse_module_list(value) == expected


def test_parse_module_list_bad_json():
    with pytest.raises(FinetuneError, match="cannot parse"):
        parse_module_list('["q_proj", ')


def test_batch_sizes_and_world_size():
    assert check_batch_sizes(16, 4, 1) == 4
    assert check_batch_sizes(16, 4, 2) == 2  # the global batch stays 16 under DDP
    with pytest.raises(FinetuneError, match="not a multiple"):
        check_batch_sizes(10, 4, 1)
    with pytest.raises(FinetuneError, match="split evenly"):
        check_batch_sizes(12, 4, 2)
    with pytest.raises(FinetuneError, match="positive"):
        check_batch_sizes(0, 4, 1)


def test_validation_split_is_seeded_and_sized(tokenizer):
    data = [dict(r, input="") for r in rows(30)]
    train_a, val_a = build_datasets(data, tokenizer, 512, True, val_set_size=6, seed=42)
    train_b, val_b = build_datasets(data, tokenizer, 512, True, val_set_size=6, seed=42)
    assert len(train_a) == 24 and len(val_a) == 6
    assert val_a["input_ids"] == val_b["input_ids"] and train_a["input_ids"] == train_b["input_ids"]
    with pytest.raises(FinetuneError, match="leaves no training rows"):
        build_datasets(data, tokenizer, 512, True, val_set_size=30)
    with pytest.raises(FinetuneError, match="too small"):
        build_datasets(data, tokenizer, 8, True, val_set_size=0)


# ---- the CLI end to end -------------------------------------------------------------------
def run_finetune(tmp_path, tiny_dir, *extra, data=None):
    data = data or write_rows(tmp_path / "train.json")
    cmd = [
        sys.executable, str(REPO_ROOT / "finetune.py"),
        "--base_model", str(tiny_dir), "--data_path", str(data),
        "--batch_size", "4", "--micro_batch_size", "2", "--cutoff_len", "512",
        "--lora_r", "4", "--lora_alpha", "8", "--target_modules", SEED_TARGETS,
        "--warmup_steps", "1", "--learning_rate", "1e-2", *extra,
    ]
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    return subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, env=env, timeout=600)


def test_finetune_writes_best_adapter_in_original_format(tmp_path, tiny_dir):
    out = tmp_path / "dora_r4"
    run = run_finetune(tmp_path, tiny_dir, "--output_dir", str(out), "--adapter_name", "dora",
                       "--val_set_size", "8", "--eval_step", "2", "--save_step", "2", "--max_steps", "6")
    assert run.returncode == 0, run.stderr[-3000:]
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "DORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert config["base_model_name_or_path"] == str(tiny_dir)
    assert config["target_modules"] == ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
    final = torch.load(out / "adapter_model.bin", weights_only=True)
    assert any(k.endswith("weight_m_wdecomp.weight") for k in final)

    # load_best_model_at_end: the saved adapter is the checkpoint with the lowest eval loss.
    log = json.loads((out / "train_log.json").read_text())
    evals = [(e["eval_loss"], e["step"]) for e in log["log_history"] if "eval_loss" in e]
    assert len(evals) == 3
    best_step = min(evals)[1]
    assert log["best_model_checkpoint"].endswith(f"checkpoint-{best_step}")
    best = torch.load(out / f"checkpoint-{best_step}" / "adapter_model.bin", weights_only=True)
    assert final.keys() == best.keys()
    for key in final:
        torch.testing.assert_close(final[key], best[key])
    # Checkpoints hold the adapter, never a copy of the frozen base model.
    assert not any((out / f"checkpoint-{best_step}" / name).exists() for name in ("model.safetensors", "pytorch_model.bin"))

    # The adapter trained (B moved away from zero) and loads strictly into the base model.
    sys.path.insert(0, str(REPO_ROOT / "peft" / "src"))
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    assert max(v.abs().max().item() for k, v in final.items() if "lora_B" in k) > 0
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir), str(out))
    assert model.peft_config.r == 4


def test_resume_from_an_adapter_folder_warm_starts_from_its_weights(tmp_path, tiny_dir, capsys):
    """The original's behaviour: a final adapter (no Trainer state) given to --resume_from_checkpoint
    is loaded as the starting weights, and training starts at step 0 with a fresh optimizer.
    (An adapter that does not fit the run is refused: tests/test_bad_inputs.py.)"""
    from commonsense.training import train

    data = write_rows(tmp_path / "train.json")
    common = dict(base_model=str(tiny_dir), data_path=str(data), adapter_name="dora", batch_size=4,
                  micro_batch_size=2, cutoff_len=512, lora_r=4, lora_alpha=8, target_modules="q_proj,v_proj",
                  val_set_size=0, save_step=100, max_steps=2, lora_dropout=0.0, warmup_steps=1)
    train(output_dir=str(tmp_path / "first"), learning_rate=1e-2, **common)
    start = torch.load(tmp_path / "first" / "adapter_model.bin", weights_only=True)
    assert all(v.abs().min() > 0 for k, v in start.items() if "lora_B" in k)  # trained: no zero left to move
    capsys.readouterr()
    # A learning rate far below an fp32 ulp of any weight: the warm-started weights must come out unchanged.
    train(output_dir=str(tmp_path / "warm"), learning_rate=1e-30, resume_from_checkpoint=str(tmp_path / "first"),
          **common)
    assert "is an adapter, not a checkpoint: starting from its weights at step 0" in capsys.readouterr().out
    log = json.loads((tmp_path / "warm" / "train_log.json").read_text())
    assert log["global_step"] == 2  # from step 0, not resumed at the first run's step 2
    got = torch.load(tmp_path / "warm" / "adapter_model.bin", weights_only=True)
    for key in start:
        torch.testing.assert_close(got[key], start[key], rtol=0, atol=0)


def test_validation_batch_is_the_originals_trainer_default(monkeypatch, tmp_path, tiny_dir):
    """The original left per_device_eval_batch_size at the Trainer's default (8)."""
    from transformers import TrainingArguments

    from commonsense import training

    seen = {}
    real = TrainingArguments.__init__

    def spy(self, *args, **kwargs):
        seen.update(kwargs)
        real(self, *args, **kwargs)
        raise KeyboardInterrupt  # stop before training

    monkeypatch.setattr(TrainingArguments, "__init__", spy)
    data = write_rows(tmp_path / "train.json")
    with pytest.raises(KeyboardInterrupt):
        training.train(base_model=str(tiny_dir), data_path=str(data), output_dir=str(tmp_path / "o"),
                       micro_batch_size=4, batch_size=16, cutoff_len=512, val_set_size=4,
                       target_modules="q_proj,v_proj")
    assert seen["per_device_eval_batch_size"] == 8 and seen["per_device_train_batch_size"] == 4
