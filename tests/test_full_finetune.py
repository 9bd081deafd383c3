"""finetune.py --adapter_name ft (full fine-tuning) on a tiny random LLaMA: what trains, the
folders it writes, resuming and evaluating (its bad inputs: tests/test_bad_inputs.py)."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tiny_models import build_tiny_llama

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("ft")
    build_tiny_llama(root / "tiny")
    rows = [{"instruction": f"Is {i} even? Answer format: true/false", "input": "",
             "output": f"the correct answer is {'true' if i % 2 == 0 else 'false'}"} for i in range(24)]
    (root / "train.json").write_text(json.dumps(rows))
    return root


def finetune(work, out, *extra):
    argv = ["--base_model", str(work / "tiny"), "--data_path", str(work / "train.json"), "--output_dir", str(out),
            "--adapter_name", "ft", "--batch_size", "4", "--micro_batch_size", "2", "--cutoff_len", "512",
            "--val_set_size", "0", "--save_step", "2", "--max_steps", "4", "--learning_rate", "1e-3",
            "--warmup_steps", "0", *extra]
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    return subprocess.run([sys.executable, str(REPO_ROOT / "finetune.py"), *argv], capture_output=True, text=True,
                          env=env, timeout=600)


def weights(folder):
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / "model.safetensors"))


@pytest.fixture(scope="module")
def ft_run(work):
    out = work / "ft"
    run = finetune(work, out)
    assert run.returncode == 0, run.stderr[-3000:]
    return out


def test_ft_trains_the_decoder_linears_and_nothing_else(work, ft_run):
    base, tuned = weights(work / "tiny"), weights(ft_run)
    assert base.keys() == tuned.keys()
    changed = {k for k in base if not torch.equal(base[k], tuned[k])}
    linears = {k for k in base if ".layers." in k and k.endswith("proj.weight")}
    assert changed == linears  # q/k/v/o/gate/up/down of every block; embeddings, norms, lm_head frozen
    marker = json.loads((ft_run / "full_finetune.json").read_text())
    assert marker["method"] == "FT" and len(marker["trained_modules"]) == 14


def test_ft_outputs_are_plain_model_folders(work, ft_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(ft_run)
    assert model.dtype == torch.float32  # fp32 master weights, saved as such
    AutoTokenizer.from_pretrained(ft_run)
    for step in (2, 4):
        checkpoint = ft_run / f"checkpoint-{step}"
        assert (checkpoint / "checkpoint_complete.json").is_file() and (checkpoint / "model.safetensors").is_file()
        assert not (checkpoint / "adapter_model.bin").exists()
        AutoModelForCausalLM.from_pretrained(checkpoint)
    torch.testing.assert_close(weights(ft_run), weights(ft_run / "checkpoint-4"), rtol=0, atol=0)


def test_ft_resumes_to_the_uninterrupted_result(work, ft_run, tmp_path):
    out = tmp_path / "resumed"
    shutil.copytree(ft_run, out)
    shutil.rmtree(out / "checkpoint-4")  # as if killed after checkpoint-2
    for name in ("model.safetensors", "train_log.json", "full_finetune.json"):
        (out / name).unlink()
    run = finetune(work, out, "--resume_from_checkpoint", "auto")
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"resuming from {out / 'checkpoint-2'}" in run.stdout
    expected, got = weights(ft_run), weights(out)
    assert expected.keys() == got.keys()
    assert [k for k in expected if not torch.equal(got[k], expected[k])] == []  # bit for bit


def test_ft_target_modules_restrict_what_trains(work, tmp_path):
    out = tmp_path / "qv"
    run = finetune(work, out, "--target_modules", "q_proj,v_proj", "--max_steps", "1")
    assert run.returncode == 0, run.stderr[-3000:]
    base, tuned = weights(work / "tiny"), weights(out)
    changed = {k.split(".")[-2] for k in base if not torch.equal(base[k], tuned[k])}
    assert changed == {"q_proj", "v_proj"}


def test_commonsense_evaluate_takes_an_ft_model(work, ft_run, tmp_path):
    run = subprocess.run([sys.executable, str(REPO_ROOT / "commonsense_evaluate.py"), "--model", "LLaMA-7B",
                          "--adapter", "FT", "--dataset", "boolq", "--base_model", str(ft_run), "--limit", "2",
                          "--output_dir", str(tmp_path / "exp")], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads((tmp_path / "exp" / "LLaMA-7B-FT-boolq.summary.json").read_text())
    assert summary["adapter"] == "FT" and summary["n"] == 2


def test_lora_weights_with_ft_is_refused():
    from commonsense.eval_model import EvaluationError, check_adapter_args

    with pytest.raises(EvaluationError, match="a fully fine-tuned model is the --base_model folder"):
        check_adapter_args("FT", "some/folder")
    assert check_adapter_args("ft", None) == "FT"
