"""finetune.py --load_4bit / --load_8bit (QDoRA, QLoRA) and evaluation on a quantized base, on the CPU.

bitsandbytes >= 0.45 runs 8-bit and 4-bit layers on the CPU; without it these tests skip.
"""
import json

import pytest
import torch

from test_training import REPO_ROOT, run_finetune, write_rows
from tiny_models import build_tiny_llama

pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    # 64 wide: bitsandbytes' CPU 4-bit inference kernel needs in_features >= its 64-value block.
    return build_tiny_llama(tmp_path_factory.mktemp("tiny_llama_64"), hidden_size=64)


def train_losses(out):
    log = json.loads((out / "train_log.json").read_text())
    return [e["loss"] for e in log["log_history"] if "loss" in e]


@pytest.mark.parametrize("adapter,flag", [
    ("dora", "--load_4bit"),
    pytest.param("lora", "--load_8bit", marks=pytest.mark.slow),
    pytest.param("dora", "--load_8bit", marks=pytest.mark.slow),
])
def test_quantized_fine_tune_learns_and_saves_a_loadable_adapter(tmp_path, tiny_dir, adapter, flag):
    out = tmp_path / f"{adapter}{flag}"
    data = write_rows(tmp_path / "train.json", n=8)  # one small batch, seen repeatedly: loss must fall
    run = run_finetune(tmp_path, tiny_dir, "--output_dir", str(out), "--adapter_name", adapter, flag,
                       "--val_set_size", "0", "--max_steps", "12", "--logging_steps", "1",
                       "--batch_size", "8", "--micro_batch_size", "8", "--learning_rate", "3e-2", data=data)
    assert run.returncode == 0, run.stderr[-3000:]
    losses = train_losses(out)
    assert len(losses) >= 10 and all(map(lambda v: v == v, losses))  # finite
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.05, losses

    # The adapter is ordinary fp32 adapter weights, usable on an unquantized base too.
    weights = torch.load(out / "adapter_model.bin", weights_only=True)
    assert all(v.dtype == torch.float32 for v in weights.values())
    assert max(v.abs().max().item() for k, v in weights.items() if "lora_B" in k) > 0
    if adapter == "dora":
        assert any(k.endswith("weight_m_wdecomp.weight") for k in weights)


def test_evaluate_with_4bit_base_keeps_the_adapter_unmerged(tmp_path, tiny_dir):
    import subprocess
    import sys

    out = tmp_path / "dora"
    run = run_finetune(tmp_path, tiny_dir, "--output_dir", str(out), "--adapter_name", "dora", "--load_4bit",
                       "--val_set_size", "0", "--max_steps", "2")
    assert run.returncode == 0, run.stderr[-3000:]
    cmd = [sys.executable, str(REPO_ROOT / "commonsense_evaluate.py"), "--model", "LLaMA-7B", "--adapter", "DoRA",
           "--dataset", "boolq", "--base_model", str(tiny_dir), "--lora_weights", str(out), "--load_4bit",
           "--limit", "2", "--mode", "loglik", "--output_dir", str(tmp_path / "experiment")]
    result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "adapter is kept unmerged" in result.stdout
    summary = json.loads(next((tmp_path / "experiment").glob("*boolq*.json")).read_text())
    assert summary  # a result file was written
