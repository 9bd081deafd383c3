"""Crash safety of training on a tiny random LLaMA (CPU, fixed seed, dropout 0.1).

finetune.py runs as a subprocess and is SIGKILLed at exact points by the test-only hook
``DORA_TEST_KILL_AT`` (commonsense.io.kill_point): during an optimizer step, in the middle of
writing a checkpoint, during evaluation. ``--resume_from_checkpoint auto`` must then finish
with an adapter bit-for-bit equal (torch.equal) to an uninterrupted run's. Also: determinism,
the non-finite stop, the completeness marker, and atomic writes under SIGKILL.
"""
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from commonsense.checkpoints import CHECKPOINT_COMPLETE, newest_complete_checkpoint, resolve_resume
from commonsense.train_options import FinetuneError
from tiny_models import build_tiny_llama

REPO_ROOT = Path(__file__).resolve().parent.parent
# 6 optimizer steps of 2 micro-batches; evaluation and a checkpoint every 2 steps; the final
# adapter is the best checkpoint's (load_best_model_at_end), so checkpoint-6 is compared too.
TRAIN_ARGS = {
    "adapter_name": "dora", "batch_size": "4", "micro_batch_size": "2", "cutoff_len": "512", "lora_r": "4",
    "lora_alpha": "8", "lora_dropout": "0.1", "target_modules": "q_proj,v_proj", "warmup_steps": "1",
    "learning_rate": "1e-2", "val_set_size": "4", "eval_step": "2", "save_step": "2", "max_steps": "6",
}
COMPARED = ("adapter_model.bin", "checkpoint-6/adapter_model.bin")


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("crash")
    build_tiny_llama(root / "tiny")
    # Fresh rows each session; every run of a session trains on the same file.
    numbers = torch.randint(0, 10**6, (24,)).tolist()
    rows = [{"instruction": f"Is {n} even? Answer format: true/false", "input": "",
             "output": f"the correct answer is {'true' if n % 2 == 0 else 'false'}"} for n in numbers]
    (root / "train.json").write_text(json.dumps(rows))
    return root


def finetune(work: Path, output_dir: Path, kill_at=None, **overrides):
    options = {**TRAIN_ARGS, "base_model": work / "tiny", "data_path": work / "train.json",
               "output_dir": output_dir, **overrides}
    env = {k: v for k, v in os.environ.items() if k != "DORA_TEST_KILL_AT"}
    if kill_at:
        env["DORA_TEST_KILL_AT"] = kill_at
    argv = [str(part) for flag, value in options.items() for part in (f"--{flag}", value)]
    return subprocess.run([sys.executable, str(REPO_ROOT / "finetune.py"), *argv], cwd=work, env=env,
                          capture_output=True, text=True, timeout=600)


def adapter(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_adapters(expected_dir: Path, got_dir: Path) -> None:
    for name in COMPARED:
        expected, got = adapter(expected_dir / name), adapter(got_dir / name)
        assert expected.keys() == got.keys()
        different = [k for k in expected if not torch.equal(expected[k], got[k])]
        assert not different, f"{name}: {len(different)} tensors differ, first {different[0]}"


@pytest.fixture(scope="module")
def reference(work):
    run = finetune(work, work / "reference")
    assert run.returncode == 0, run.stderr[-3000:]
    return work / "reference"


# ---- determinism ------------------------------------------------------------------------------
@pytest.mark.slow  # the default suite checks it up to the checkpoint a kill leaves (below)
def test_same_seed_and_data_give_the_same_adapter(work, reference):
    again = finetune(work, work / "again")
    assert again.returncode == 0, again.stderr[-3000:]
    assert_same_adapters(reference, work / "again")
    # Not vacuous: training moved lora_B away from its zero init, so equal means equally trained.
    trained = adapter(reference / "adapter_model.bin")
    assert all(trained[k].abs().max() > 0 for k in trained if "lora_B" in k)


# ---- SIGKILL, then resume ---------------------------------------------------------------------
KILLS = [
    # (kill point, the newest complete checkpoint the kill leaves)
    pytest.param("save:4", "checkpoint-2", id="during a checkpoint save"),
    pytest.param("step:5", "checkpoint-4", id="during a step", marks=pytest.mark.slow),
    pytest.param("eval:6", "checkpoint-4", id="during evaluation", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("kill_at,left", KILLS)
def test_sigkill_then_resume_auto_gives_the_uninterrupted_adapter(work, reference, kill_at, left):
    out = work / f"killed_{kill_at.replace(':', '_')}"
    killed = finetune(work, out, kill_at=kill_at)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert not (out / "adapter_model.bin").exists()
    assert newest_complete_checkpoint(str(out)) == str(out / left)
    # Determinism: up to the kill, this process trained exactly as the reference did.
    before_kill, reference_then = adapter(out / left / "adapter_model.bin"), adapter(reference / left / "adapter_model.bin")
    assert all(torch.equal(before_kill[k], reference_then[k]) for k in reference_then)
    if kill_at.startswith("save:"):
        cut = out / f"checkpoint-{kill_at.split(':')[1]}"
        assert (cut / "adapter_model.bin").exists() and not (cut / CHECKPOINT_COMPLETE).exists()
        # The previous checkpoint is whole and loads strictly into the model.
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(work / "tiny"), str(out / left))

    resumed = finetune(work, out, resume_from_checkpoint="auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {out / left}" in resumed.stdout
    assert_same_adapters(reference, out)


def test_resolve_resume_skips_incomplete_checkpoints(tmp_path):
    for step, complete in ((2, True), (4, True), (6, False)):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        (folder / "adapter_model.bin").write_bytes(b"x")
        if complete:
            (folder / CHECKPOINT_COMPLETE).write_text("{}")
    (tmp_path / "checkpoint-10.tmp").mkdir()  # not a checkpoint name
    assert resolve_resume("auto", str(tmp_path)) == str(tmp_path / "checkpoint-4")
    assert resolve_resume(str(tmp_path / "checkpoint-2"), str(tmp_path)) == str(tmp_path / "checkpoint-2")
    with pytest.raises(FinetuneError, match="checkpoint-6 is incomplete"):
        resolve_resume(str(tmp_path / "checkpoint-6"), str(tmp_path))
    assert resolve_resume("auto", str(tmp_path / "missing")) is None
    assert resolve_resume(None, str(tmp_path)) is None


# ---- non-finite loss or gradients ----------------------------------------------------------
def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(work):
    out = work / "diverged"
    # A learning rate of 1e30 sends the weights to ~1e30 in one AdamW step: the loss is NaN soon.
    run = finetune(work, out, learning_rate="1e30", val_set_size="0", save_step="1", max_steps="6")
    assert run.returncode == 2, run.stderr[-3000:]
    assert "Traceback" not in run.stderr
    last_line = run.stderr.strip().splitlines()[-1]
    found = re.fullmatch(r"error: non-finite loss at step (\d+) \(last good checkpoint: (.*checkpoint-(\d+))\)",
                         last_line)
    assert found, last_line
    failed_step, last_good, last_good_step = int(found[1]), Path(found[2]), int(found[3])
    assert last_good_step == failed_step - 1 and last_good == out / f"checkpoint-{last_good_step}"
    assert not (out / f"checkpoint-{failed_step}").exists() and not (out / "adapter_model.bin").exists()
    tensors = adapter(last_good / "adapter_model.bin")
    assert all(torch.isfinite(t).all() for t in tensors.values())
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(work / "tiny"), str(last_good))


@pytest.mark.parametrize("norm", [float("nan"), float("inf")])
def test_non_finite_gradient_norm_stops_before_the_optimizer_step(work, tmp_path, norm):
    from transformers import AutoModelForCausalLM, TrainingArguments

    from commonsense.trainer import NonFiniteError, adapter_trainer_class
    from peft import DoraConfig, get_peft_model

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(work / "tiny"),
                           DoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    trainer = adapter_trainer_class()(model=model, args=args)
    assert trainer._get_grad_norm(model, grad_norm=torch.tensor(2.5)) == 2.5
    with pytest.raises(NonFiniteError, match=r"^non-finite gradient norm at step 1 \(last good checkpoint: none yet\)$"):
        trainer._get_grad_norm(model, grad_norm=torch.tensor(norm))


# ---- atomic writes under SIGKILL -------------------------------------------------------------
KILL_BEFORE_RENAME = """
import os, signal, sys
sys.path[:0] = [{root!r}, {root!r} + "/peft/src"]
real_replace = os.replace
def die(*args):  # the new file is fully written and fsynced; die just before it replaces the old one
    os.kill(os.getpid(), signal.SIGKILL)
"""


def run_and_kill(script: str) -> None:
    done = subprocess.run([sys.executable, "-c", KILL_BEFORE_RENAME.format(root=str(REPO_ROOT)) + script],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == -signal.SIGKILL, done.stderr[-3000:]


def test_sigkill_during_a_json_save_leaves_the_previous_version(tmp_path):
    from commonsense.io import atomic_write_json

    target = tmp_path / "results.json"
    atomic_write_json(target, {"version": 1})
    run_and_kill(f"""
from commonsense.io import atomic_write_json
os.replace = die
atomic_write_json({str(target)!r}, {{"version": 2}})
""")
    assert json.loads(target.read_text()) == {"version": 1}


def test_sigkill_during_an_adapter_save_leaves_the_previous_adapter_loadable(work, tmp_path):
    from peft import DoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    config = DoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], task_type="CAUSAL_LM")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(work / "tiny"), config)
    model.save_pretrained(str(tmp_path))
    before = adapter(tmp_path / "adapter_model.bin")
    # The second save writes half a file, then dies: torch.save itself is interrupted.
    run_and_kill(f"""
import torch
from peft import DoraConfig, get_peft_model
from peft.utils import save_and_load
from transformers import AutoModelForCausalLM
model = get_peft_model(AutoModelForCausalLM.from_pretrained({str(work / "tiny")!r}),
                       DoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], task_type="CAUSAL_LM"))
with torch.no_grad():
    for p in model.parameters():
        if p.requires_grad:
            p.add_(1.0)
def half_then_die(obj, path):
    with open(path, "wb") as f:
        f.write(b"PK\\x03\\x04 half an adapter")
        f.flush()
    die()
save_and_load.torch.save = half_then_die
model.save_pretrained({str(tmp_path)!r})
""")
    after = adapter(tmp_path / "adapter_model.bin")
    assert all(torch.equal(before[k], after[k]) for k in before)
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(work / "tiny"), str(tmp_path))
