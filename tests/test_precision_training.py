"""Training precision on the CPU standing in for the GPU: fp16 loss scaling, --bf16 autocast,
one process on several GPUs, and the CUDA dtype choices.

A CPU has no fp16 GradScaler in accelerate, so the scaler tests give the Trainer's accelerator
a ``torch.amp.GradScaler("cpu")`` and the unscale step accelerate runs for fp16 on CUDA, and run
the loss under CPU fp16 autocast (as accelerate does on CUDA): fp16 activation gradients then
overflow at a large scale, and the scaling, unscaling, skipping and halving are torch's own.
"""
import functools
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from commonsense.train_options import FinetuneError
from commonsense.trainer import MIN_LOSS_SCALE, NonFiniteError, adapter_trainer_class
from commonsense.training import build_datasets, training_precision
from tiny_models import build_tiny_llama

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("tiny_precision"))


def rows(n=16):
    return [{"instruction": f"Is {i} even? Answer format: true/false", "input": "",
             "output": f"the correct answer is {'true' if i % 2 == 0 else 'false'}"} for i in range(n)]


def make_trainer(tiny_dir, out, max_steps=6, **arg_overrides):
    from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq, TrainingArguments

    from commonsense.models import configure_padding, load_tokenizer
    from peft import DoraConfig, get_peft_model

    torch.manual_seed(0)
    tokenizer = load_tokenizer(str(tiny_dir), padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    configure_padding(tokenizer, model)
    model = get_peft_model(model, DoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                             task_type="CAUSAL_LM"))
    train, _ = build_datasets(rows(), tokenizer, 512, True, 0)
    args = TrainingArguments(output_dir=str(out), use_cpu=True, report_to="none", per_device_train_batch_size=4,
                             max_steps=max_steps, learning_rate=1e-2, warmup_steps=0, logging_steps=1,
                             save_strategy="no", remove_unused_columns=False, seed=0, **arg_overrides)
    collator = DataCollatorForSeq2Seq(tokenizer, pad_to_multiple_of=8, return_tensors="pt", padding=True)
    return adapter_trainer_class()(model=model, args=args, train_dataset=train, data_collator=collator)


def give_loss_scaler(trainer, init_scale: float) -> torch.amp.GradScaler:
    """What accelerate sets up for fp16 on CUDA: fp16 autocast around the loss, and a GradScaler
    used by backward, by the unscale before gradient clipping, and by the optimizer step (which
    it skips on overflow)."""
    from accelerate.optimizer import AcceleratedOptimizer

    compute_loss = trainer.compute_loss

    def compute_loss_under_fp16_autocast(*args, **kwargs):
        with torch.autocast("cpu", dtype=torch.float16):
            return compute_loss(*args, **kwargs)

    trainer.compute_loss = compute_loss_under_fp16_autocast
    accelerator = trainer.accelerator
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    accelerator.scaler = scaler  # read by backward() and, at prepare(), by AcceleratedOptimizer

    def unscale_gradients(optimizer=None):
        for opt in accelerator._optimizers:
            while isinstance(opt, AcceleratedOptimizer):
                opt = opt.optimizer
            scaler.unscale_(opt)

    accelerator.unscale_gradients = unscale_gradients
    return scaler


def adapter_state(trainer):
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}


# ---- fp16 loss scaling -----------------------------------------------------------------------
def test_overflowing_loss_scale_skips_steps_and_training_goes_on(tiny_dir, tmp_path):
    trainer = make_trainer(tiny_dir, tmp_path, max_steps=12)
    # At 2^24 the fp16 activation gradients overflow; the scaler halves until they fit.
    scaler = give_loss_scaler(trainer, init_scale=2.0**24)
    before = adapter_state(trainer)
    trainer.train()
    skipped = trainer.skipped_steps
    assert skipped == list(range(1, len(skipped) + 1)) and 1 <= len(skipped) < 8, skipped
    assert scaler.get_scale() == 2.0 ** (24 - len(skipped))
    after = adapter_state(trainer)
    assert all(torch.isfinite(t).all() for t in after.values())
    assert any(not torch.equal(before[n], after[n]) for n in before)  # the later steps did train
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert losses[-1] < losses[0]


def test_skipped_step_leaves_the_adapter_untouched(tiny_dir, tmp_path):
    trainer = make_trainer(tiny_dir, tmp_path, max_steps=1)
    give_loss_scaler(trainer, init_scale=2.0**24)
    before = adapter_state(trainer)
    trainer.train()
    assert trainer.skipped_steps == [1]
    assert all(torch.equal(before[n], t) for n, t in adapter_state(trainer).items())


def test_nan_that_persists_stops_once_the_scale_bottoms_out(tiny_dir, tmp_path):
    trainer = make_trainer(tiny_dir, tmp_path, max_steps=10)
    with torch.no_grad():
        trainer.model.base_model.model.model.norm.weight[0] = float("nan")  # NaN at every scale
    give_loss_scaler(trainer, init_scale=4.0)
    # scale 4 and 2 are skipped; at 1 (= MIN_LOSS_SCALE) halving cannot help any more
    assert MIN_LOSS_SCALE == 1.0
    with pytest.raises(NonFiniteError, match=r"^non-finite loss at step 3 with the fp16 loss scale down to 1 "
                                             r"\(last good checkpoint: none yet\)$"):
        trainer.train()
    assert trainer.skipped_steps == [1, 2]


def test_nan_without_a_scaler_stops_at_the_first_step(tiny_dir, tmp_path):
    trainer = make_trainer(tiny_dir, tmp_path)
    with torch.no_grad():
        trainer.model.base_model.model.model.norm.weight[0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"^non-finite loss at step 1 \(last good checkpoint: none yet\)$"):
        trainer.train()


def test_non_finite_loss_with_finite_gradients_is_an_error_even_with_a_scaler(tiny_dir, tmp_path):
    trainer = make_trainer(tiny_dir, tmp_path)
    give_loss_scaler(trainer, init_scale=2.0**10)
    compute_loss = trainer.compute_loss

    def nan_constant_added(*args, **kwargs):  # NaN in the loss value, none in its gradient
        return compute_loss(*args, **kwargs) + torch.tensor(float("nan"))

    trainer.compute_loss = nan_constant_added
    with pytest.raises(NonFiniteError, match=r"^non-finite loss at step 1 with finite gradients"):
        trainer.train()


# ---- precision choices -----------------------------------------------------------------------
def test_training_precision_per_device(monkeypatch):
    monkeypatch.setattr("commonsense.training.cuda_bf16_supported", lambda: True)
    assert training_precision(cuda=True, bf16=False, fsdp=False) == ("fp16", True, False)  # the seed's recipe
    assert training_precision(cuda=True, bf16=True, fsdp=False) == ("bf16", False, True)
    assert training_precision(cuda=True, bf16=False, fsdp=True) == ("fp32", True, False)  # FSDP mixed precision
    assert training_precision(cuda=True, bf16=True, fsdp=True) == ("fp32", False, True)
    assert training_precision(cuda=False, bf16=False, fsdp=False) == ("fp32", False, False)
    assert training_precision(cuda=False, bf16=True, fsdp=False) == ("fp32", False, True)  # CPU autocast
    monkeypatch.setattr("commonsense.training.cuda_bf16_supported", lambda: False)
    with pytest.raises(FinetuneError, match="this GPU does not support bfloat16"):
        training_precision(cuda=True, bf16=True, fsdp=False)
    assert training_precision(cuda=True, bf16=False, fsdp=False) == ("fp16", True, False)


def finetune(tiny_dir, tmp_path, out, *extra):
    data = tmp_path / "train.json"
    data.write_text(json.dumps(rows(24)))
    argv = ["--base_model", str(tiny_dir), "--data_path", str(data), "--output_dir", str(out),
            "--adapter_name", "dora", "--batch_size", "4", "--micro_batch_size", "2", "--lora_r", "4",
            "--lora_alpha", "8", "--target_modules", "q_proj,v_proj,up_proj", "--learning_rate", "1e-2",
            "--warmup_steps", "0", "--val_set_size", "0", "--num_epochs", "1", "--logging_steps", "1", "--cutoff_len",
            "512", *extra]
    return subprocess.run([sys.executable, str(REPO_ROOT / "finetune.py"), *argv], capture_output=True, text=True,
                          timeout=600)


def test_finetune_bf16_on_cpu_trains_through_autocast_with_an_fp32_adapter(tiny_dir, tmp_path):
    out = tmp_path / "bf16"
    run = finetune(tiny_dir, tmp_path, out, "--bf16")
    assert run.returncode == 0, run.stderr[-3000:]
    log = json.loads((out / "train_log.json").read_text())
    losses = [e["loss"] for e in log["log_history"] if "loss" in e]
    assert len(losses) == 6 and losses[-1] < losses[0]
    tensors = torch.load(out / "adapter_model.bin", weights_only=True)
    assert tensors and all(t.dtype == torch.float32 for t in tensors.values())
    # It really ran under bf16 autocast: the loss differs from an fp32 run's, by a bf16-sized amount.
    fp32 = tmp_path / "fp32"
    assert finetune(tiny_dir, tmp_path, fp32).returncode == 0
    fp32_losses = [e["loss"] for e in json.loads((fp32 / "train_log.json").read_text())["log_history"] if "loss" in e]
    assert losses[0] != fp32_losses[0] and abs(losses[0] - fp32_losses[0]) < 0.05 * fp32_losses[0]


def test_several_visible_gpus_without_a_launcher_train_on_one(tiny_dir, tmp_path, monkeypatch, capsys):
    """The Trainer would wrap the model in DataParallel and double each step's examples."""
    from transformers import TrainingArguments

    from commonsense.training import train

    original = TrainingArguments._setup_devices

    def two_gpus_visible(self):
        device = original.func(self)
        self._n_gpu = 2  # what torch.cuda.device_count() gives on a 2-GPU machine
        return device

    prop = functools.cached_property(two_gpus_visible)
    prop.__set_name__(TrainingArguments, "_setup_devices")
    monkeypatch.setattr(TrainingArguments, "_setup_devices", prop)
    data = tmp_path / "train.json"
    data.write_text(json.dumps(rows(24)))
    out = tmp_path / "out"
    train(base_model=str(tiny_dir), data_path=str(data), output_dir=str(out), adapter_name="dora", batch_size=4,
          micro_batch_size=4, lora_r=4, lora_alpha=8, target_modules="q_proj,v_proj", val_set_size=0,
          num_epochs=1, warmup_steps=0, cutoff_len=512)
    log = json.loads((out / "train_log.json").read_text())
    assert log["global_step"] == 6  # 24 rows / batch 4; DataParallel over 2 would give 3 steps of 8
    assert "2 GPUs are visible but finetune.py runs as one process" in capsys.readouterr().out


def test_evaluate_dtype_flag():
    sys.path.insert(0, str(REPO_ROOT))
    import commonsense_evaluate

    base = ["--dataset", "boolq", "--model", "LLaMA-7B", "--adapter", "none", "--base_model", "x"]
    assert commonsense_evaluate.parse_args(base).dtype == "auto"
    assert commonsense_evaluate.parse_args(base + ["--dtype", "bf16"]).dtype == "bf16"
    with pytest.raises(SystemExit):
        commonsense_evaluate.parse_args(base + ["--dtype", "int8"])


# ---- on a GPU (benchmarks/gpu_check.sh): the real fp16 scaler and bf16 autocast -----------------
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_finetune_on_cuda(tiny_dir, tmp_path, precision):
    """The seed's default (fp16 base, fp16 autocast + GradScaler) and --bf16, end to end on CUDA."""
    out = tmp_path / precision
    run = finetune(tiny_dir, tmp_path, out, *(["--bf16"] if precision == "bf16" else []))
    assert run.returncode == 0, run.stderr[-3000:]
    log = json.loads((out / "train_log.json").read_text())
    losses = [e["loss"] for e in log["log_history"] if "loss" in e]
    assert log["device"] == "cuda" and losses[-1] < losses[0], losses
    assert len(log["skipped_steps"]) < log["global_step"]
    tensors = torch.load(out / "adapter_model.bin", weights_only=True)
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in tensors.values())
