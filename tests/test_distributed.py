"""Several processes on the CPU (gloo): finetune.py under torchrun and accelerate (DDP) against one
process, resuming under DDP, and the DoRA layer under FSDP1/FSDP2 against one process."""
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tiny_models import build_tiny_llama

REPO_ROOT = Path(__file__).resolve().parent.parent
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch"]

# The comparison is exact up to float summation order (measured: bitwise equal on CPU, eval losses
# within 5e-7); these leave room for that order alone, far below what a training step moves.
ADAPTER_TOLERANCE = dict(atol=1e-6, rtol=1e-5)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="module")
def data_path(tmp_path_factory):
    """24 distinct rows (fresh each run; the seed is printed): 16 train, 8 validation."""
    seed = random.SystemRandom().randrange(2**31)
    print(f"data seed {seed}")
    rng = random.Random(seed)
    rows = []
    for i in range(24):
        a, b = rng.randrange(1000), rng.randrange(1000)
        answer = "true" if (a + b) % 2 == 0 else "false"
        rows.append({"instruction": f"Is {a} + {b} even? Answer format: true/false", "input": "",
                     "output": f"the correct answer is {answer}", "answer": answer})
    path = tmp_path_factory.mktemp("data") / "train.json"
    path.write_text(json.dumps(rows))
    return path


DORA_ARGS = ("--adapter_name", "dora", "--lora_r", "4", "--lora_alpha", "8", "--lora_dropout", "0",
             "--target_modules", '["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]')
FT_ARGS = ("--adapter_name", "ft", "--learning_rate", "1e-3")


def finetune(launcher, out: Path, tiny_dir, data_path, *extra, gpu=False, method_args=DORA_ARGS):
    """finetune.py with the seed scripts' recipe shrunk: global batch 4 (micro 2), 6 steps (1.5
    epochs of 16 rows), evaluation and a checkpoint every 2 steps, gradient checkpointing.
    On the CPU (gloo) unless ``gpu``."""
    learning_rate = () if "--learning_rate" in method_args else ("--learning_rate", "1e-2")
    cmd = [
        *launcher, str(REPO_ROOT / "finetune.py"),
        "--base_model", str(tiny_dir), "--data_path", str(data_path), "--output_dir", str(out),
        *method_args, *learning_rate,
        "--batch_size", "4", "--micro_batch_size", "2", "--max_steps", "6", "--cutoff_len", "512",
        "--val_set_size", "8", "--eval_step", "2", "--save_step", "2",
        "--warmup_steps", "1", "--use_gradient_checkpointing", *extra,
    ]
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    if not gpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    run = subprocess.run(cmd, cwd=out.parent, capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, (run.stdout[-3000:], run.stderr[-3000:])
    return run


def load_adapter_file(folder: Path) -> dict:
    return torch.load(folder / "adapter_model.bin", weights_only=True)


def assert_same_adapter(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], **ADAPTER_TOLERANCE, msg=key)


def eval_losses(folder: Path) -> list:
    log = json.loads((folder / "train_log.json").read_text())
    return [(e["step"], e["eval_loss"]) for e in log["log_history"] if "eval_loss" in e]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, tiny_dir, data_path):
    out = tmp_path_factory.mktemp("one") / "adapter"
    finetune([sys.executable], out, tiny_dir, data_path)
    return out


@pytest.fixture(scope="module")
def torchrun_ddp(tmp_path_factory, tiny_dir, data_path):
    out = tmp_path_factory.mktemp("ddp") / "adapter"  # not created yet: both processes meet a missing folder
    run = finetune(TORCHRUN, out, tiny_dir, data_path)
    return out, run


def test_torchrun_ddp_matches_one_process(one_process, torchrun_ddp):
    """torchrun --nproc_per_node 2 trains the same adapter as one process with the same global batch.

    Why they can match exactly: (1) the same examples at every step -- accelerate replaces Trainer's
    RandomSampler by a SeedableRandomSampler seeded with data_seed (+ epoch) in both runs, so the
    permutation is the same, and under DDP its BatchSamplerShard deals micro-batch i to rank i mod 2,
    so a step's two micro-batches are exactly the two the single process accumulates (16 rows split
    evenly: no wrap-around padding); (2) the same loss scale -- transformers 5 divides each
    micro-batch's token-loss sum by num_items_in_batch, the label-token count of the whole step
    (summed over ranks under DDP), and multiplies by the world size that DDP's gradient averaging
    divides out; (3) no randomness left: lora_dropout 0, the same seed for the adapter init.
    What may differ is only float summation order (two micro-batch gradients added by
    accumulation vs by all-reduce). Tolerance: atol 1e-6, rtol 1e-5 on every adapter tensor and
    1e-6 relative on the eval losses; measured: bitwise equal adapters, eval losses within 5e-7.
    A wrong order or scale moves them by ~1e-2 (the steps below), far outside it.
    """
    ddp_out, run = torchrun_ddp
    assert_same_adapter(load_adapter_file(ddp_out), load_adapter_file(one_process))
    one, ddp = eval_losses(one_process), eval_losses(ddp_out)
    assert [s for s, _ in ddp] == [s for s, _ in one] == [2, 4, 6]
    for (_, a), (_, b) in zip(ddp, one):
        assert a == pytest.approx(b, rel=1e-6)

    # The comparison means something: training moved the adapter far beyond the tolerance.
    final, early = load_adapter_file(ddp_out), load_adapter_file(ddp_out / "checkpoint-2")
    assert max((final[k] - early[k]).abs().max().item() for k in final) > 1e-3

    # Two processes trained (each saved its RNG state); one wrote the adapter, once.
    log = json.loads((ddp_out / "train_log.json").read_text())
    assert log["world_size"] == 2 and json.loads((one_process / "train_log.json").read_text())["world_size"] == 1
    for step in (2, 4, 6):
        assert {p.name for p in (ddp_out / f"checkpoint-{step}").glob("rng_state*")} == {"rng_state_0.pth", "rng_state_1.pth"}
    output = run.stdout + run.stderr
    assert output.count("saved the DORA adapter to") == 1, output[-3000:]
    assert output.count("trainable params") == 1 and output.count("loading the best checkpoint") == 1


@pytest.mark.slow
def test_resume_under_ddp_gives_the_same_adapter(tmp_path, torchrun_ddp, tiny_dir, data_path):
    """A DDP run killed after checkpoint-4 and resumed (auto) ends with the uninterrupted run's
    adapter (optimizer, scheduler and each rank's RNG state restored)."""
    ddp_out, _ = torchrun_ddp
    resumed = tmp_path / "adapter"
    shutil.copytree(ddp_out, resumed)
    shutil.rmtree(resumed / "checkpoint-6")
    for name in ("adapter_model.bin", "adapter_config.json", "train_log.json"):
        (resumed / name).unlink()
    finetune(TORCHRUN, resumed, tiny_dir, data_path, "--resume_from_checkpoint", "auto")
    assert_same_adapter(load_adapter_file(resumed), load_adapter_file(ddp_out))
    assert json.loads((resumed / "train_log.json").read_text())["global_step"] == 6


@pytest.mark.slow
def test_accelerate_launch_ddp_matches_one_process(tmp_path, one_process, tiny_dir, data_path):
    """accelerate launch with the shipped DDP config (2 processes; on a CPU-only machine accelerate
    runs them with gloo) gives the one-process adapter, as torchrun does (same reasons).
    ``accelerate launch --cpu --num_processes 2`` is not used: with --cpu accelerate starts one
    process unless mpirun is configured."""
    out = tmp_path / "adapter"
    run = finetune([*ACCELERATE, "--config_file", str(REPO_ROOT / "configs" / "accelerate_ddp.yaml"),
                    "--num_processes", "2"], out, tiny_dir, data_path)
    assert json.loads((out / "train_log.json").read_text())["world_size"] == 2
    assert_same_adapter(load_adapter_file(out), load_adapter_file(one_process))
    assert (run.stdout + run.stderr).count("saved the DORA adapter to") == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="accelerate runs FSDP only on GPUs (benchmarks/gpu_check.sh)")
def test_accelerate_fsdp_on_gpus(tmp_path, tiny_dir, data_path):
    """finetune.py under accelerate with the shipped FSDP config, one process per GPU (up to 2: the
    recipe's 2 accumulation steps split over at most 2). Checkpoints and the final adapter are
    gathered from the shards into the usual adapter-only files, written once; no checkpoint holds a
    copy of the base model. The base computes in fp16 through FSDP's mixed precision instead of being
    stored in fp16, so the eval losses match the one-process run loosely (1e-2 relative)."""
    processes = min(torch.cuda.device_count(), 2)
    one_process, out = tmp_path / "one", tmp_path / "fsdp"
    finetune([sys.executable], one_process, tiny_dir, data_path, gpu=True)
    run = finetune([*ACCELERATE, "--config_file", str(REPO_ROOT / "configs" / "accelerate_fsdp.yaml"),
                    "--num_processes", str(processes)], out, tiny_dir, data_path, gpu=True)
    assert (run.stdout + run.stderr).count("saved the DORA adapter to") == 1
    got, expected = load_adapter_file(out), load_adapter_file(one_process)
    assert {k: v.shape for k, v in got.items()} == {k: v.shape for k, v in expected.items()}
    for (_, a), (_, b) in zip(eval_losses(out), eval_losses(one_process)):
        assert a == pytest.approx(b, rel=1e-2)
    for step in (2, 4, 6):
        names = {p.name for p in (out / f"checkpoint-{step}").iterdir()}
        assert "adapter_model.bin" in names and not any(n.startswith("pytorch_model") for n in names), names


def model_weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def test_full_finetune_under_torchrun_ddp_matches_one_process(tmp_path, tiny_dir, data_path):
    """FT under DDP: the same weights as one process (the model folder written once, by process 0)."""
    one, ddp = tmp_path / "one", tmp_path / "ddp"
    finetune([sys.executable], one, tiny_dir, data_path, method_args=FT_ARGS)
    run = finetune(TORCHRUN, ddp, tiny_dir, data_path, method_args=FT_ARGS)
    assert (run.stdout + run.stderr).count("saved the fully fine-tuned model to") == 1
    expected, got = model_weights(one), model_weights(ddp)
    assert got.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], **ADAPTER_TOLERANCE, msg=key)
    assert [l for _, l in eval_losses(ddp)] == pytest.approx([l for _, l in eval_losses(one)], rel=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="accelerate runs FSDP only on GPUs (benchmarks/gpu_check.sh)")
def test_accelerate_fsdp_on_gpus_full_finetune(tmp_path, tiny_dir, data_path):
    """FT under FSDP: the full state is gathered on save into one plain model folder."""
    processes = min(torch.cuda.device_count(), 2)
    one, out = tmp_path / "one", tmp_path / "fsdp"
    finetune([sys.executable], one, tiny_dir, data_path, gpu=True, method_args=FT_ARGS)
    finetune([*ACCELERATE, "--config_file", str(REPO_ROOT / "configs" / "accelerate_fsdp.yaml"),
              "--num_processes", str(processes)], out, tiny_dir, data_path, gpu=True, method_args=FT_ARGS)
    got, expected = model_weights(out), model_weights(one)
    assert {k: v.shape for k, v in got.items()} == {k: v.shape for k, v in expected.items()}
    for (_, a), (_, b) in zip(eval_losses(out), eval_losses(one)):
        assert a == pytest.approx(b, rel=1e-2)


# ---- DoRA under FSDP ------------------------------------------------------------------------
def run_fsdp_worker(tmp_path, mode: str) -> list:
    seed = random.SystemRandom().randrange(2**31)
    cmd = [*TORCHRUN, str(REPO_ROOT / "tests" / "fsdp_worker.py"), mode, str(seed), str(tmp_path)]
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, (f"seed {seed}", run.stdout[-3000:], run.stderr[-3000:])
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.parametrize("mode", ["fsdp1", pytest.param("fsdp2", marks=pytest.mark.slow)])
def test_dora_under_fsdp_matches_one_process(tmp_path, mode):
    """Sharded over 2 processes (one FSDP unit per decoder layer), the DoRA model's forward, adapter
    gradients, one SGD step and the forward after it match the whole model on the whole batch
    (fp32; measured differences <= 1e-7, gradients ~3e-2: tolerance 1e-6 for the step and 1e-5 for
    logits). After new adapter values are loaded into the shards the output follows them: with
    storage-keyed norm caches a process reused the old norm here (logits off by ~0.1). A DoRA
    layer handed a sharded weight raises ShardedWeightError instead of computing a wrong norm."""
    for result in run_fsdp_worker(tmp_path, mode):
        assert result["world"] == 2
        assert result["grad_scale"] > 1e-3  # the gradients compared are not trivially zero
        assert result["grads"] < 1e-6 and result["step"] < 1e-6, result
        for key in ("forward", "forward_after_step", "forward_after_load"):
            assert result[key] < 1e-5, (key, result)
        for key in ("norm_outside_forward_error", "linear_wrapped_alone_error"):
            assert "DoRA needs the full rows of the base weight" in result[key], (key, result[key])
        if mode == "fsdp1":
            check_fsdp_mixed_precision(result["mixed_precision"])


def check_fsdp_mixed_precision(runs: dict) -> None:
    """bf16 mixed precision: FSDP casts every parameter of a unit to bf16 for the forward. With
    keep_magnitude_fp32 (what finetune.py applies) the magnitude stays fp32, so the m that g = m / n
    applies is the fp32 master (error ~1e-7); without it m is bf16, off by up to one bf16 rounding
    (2^-8 = 3.9e-3)."""
    fixed, unfixed = runs["fixed"], runs["unfixed"]
    assert fixed["m_dtypes"] == ["torch.float32"] and unfixed["m_dtypes"] == ["torch.bfloat16"], runs
    assert fixed["logits_dtype"] == "torch.bfloat16"  # the rest still computes in bf16
    assert fixed["magnitude_grads_ok"] and unfixed["magnitude_grads_ok"], runs
    assert fixed["max_m_error"] < 1e-6 and unfixed["max_m_error"] > 1e-4, runs


# ---- the checks without processes -----------------------------------------------------------
def test_keep_magnitude_fp32_adds_the_magnitude_class_once():
    from torch.distributed.fsdp import MixedPrecision, MixedPrecisionPolicy
    from torch.nn.modules.batchnorm import _BatchNorm

    from peft.tuners.dora import DoraMagnitude
    from peft.tuners.sharding import keep_magnitude_fp32

    policy = MixedPrecision(param_dtype=torch.bfloat16)
    assert keep_magnitude_fp32(keep_magnitude_fp32(policy)) is policy
    assert policy._module_classes_to_ignore == (_BatchNorm, DoraMagnitude)
    assert keep_magnitude_fp32(None) is None
    fsdp2 = MixedPrecisionPolicy(param_dtype=torch.bfloat16)
    assert keep_magnitude_fp32(fsdp2) is fsdp2 and not hasattr(fsdp2, "_module_classes_to_ignore")


def test_sharded_or_freed_weights_are_refused():
    from peft.tuners.dora import DoraLinear
    from peft.tuners.sharding import ShardedWeightError, check_full_weight

    layer = DoraLinear(torch.nn.Linear(16, 12), r=4, lora_alpha=8)
    check_full_weight(layer.base_layer.weight, 12, 16)  # whole: fine
    with pytest.raises(ShardedWeightError, match=r"shape \(96,\)"):
        check_full_weight(torch.randn(96), 12, 16)  # a flat shard
    freed = torch.randn(12, 16)
    freed.untyped_storage().resize_(0)  # what FSDP leaves after resharding
    with pytest.raises(ShardedWeightError, match="freed storage"):
        check_full_weight(freed, 12, 16)
    layer.base_layer.weight = torch.nn.Parameter(torch.randn(6, 16), requires_grad=False)  # half the rows
    with pytest.raises(ShardedWeightError, match="full rows"):
        layer(torch.randn(3, 16))


def test_norm_caching_can_be_turned_off_and_plain_tensors_are_not_cached():
    from peft.tuners.dora import DoraLinear
    from peft.tuners.sharding import set_norm_caching

    layer = DoraLinear(torch.nn.Linear(16, 12), r=4, lora_alpha=8)
    assert layer.weight_sq_norm() is layer.weight_sq_norm()  # cached
    assert set_norm_caching(torch.nn.Sequential(layer), False) == 1
    assert layer.weight_sq_norm() is not layer.weight_sq_norm()
    torch.testing.assert_close(layer.weight_sq_norm(), layer.base_layer.weight.detach().pow(2).sum(1))
    set_norm_caching(layer, True)
    # A weight that is not the module's own Parameter (how FSDP1 lends the unsharded weight) is not cached.
    del layer.base_layer.weight
    layer.base_layer.weight = torch.randn(12, 16)
    assert layer.weight_sq_norm() is not layer.weight_sq_norm()


@pytest.mark.parametrize(
    "env,message",
    [
        ({"FSDP_VERSION": "2"}, "FSDP_VERSION=2 is not supported"),
        ({"FSDP_USE_ORIG_PARAMS": "false"}, "FSDP_USE_ORIG_PARAMS=false is not supported"),
        ({"FSDP_STATE_DICT_TYPE": "SHARDED_STATE_DICT"}, "FSDP_STATE_DICT_TYPE=SHARDED_STATE_DICT is not supported"),
        ({"QUANTIZED": "1"}, "cannot shard an 8-bit/4-bit base model"),
    ],
)
def test_unsupported_fsdp_setups_are_refused(monkeypatch, env, message):
    from commonsense.distributed import DistributedSetupError, check_fsdp_setup

    base = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1", "FSDP_USE_ORIG_PARAMS": "true",
            "FSDP_STATE_DICT_TYPE": "FULL_STATE_DICT"}
    for key, value in {**base, **env}.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(DistributedSetupError, match=message):
        check_fsdp_setup(cuda=True, quantized="QUANTIZED" in env)


def test_fsdp_config_on_a_cpu_machine_says_it_runs_ddp(monkeypatch, capsys):
    from commonsense.distributed import check_fsdp_setup

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.delenv("RANK", raising=False)
    assert check_fsdp_setup(cuda=False) is False
    assert "trains with DDP" in capsys.readouterr().out
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "false")
    assert check_fsdp_setup(cuda=True) is False


def test_shipped_accelerate_configs_load_and_meet_the_fsdp_requirements(monkeypatch):
    from accelerate.commands.config.config_args import load_config_from_file

    from commonsense.distributed import check_fsdp_setup

    ddp = load_config_from_file(str(REPO_ROOT / "configs" / "accelerate_ddp.yaml"))
    assert ddp.distributed_type == "MULTI_GPU" and ddp.num_processes == 2
    fsdp = load_config_from_file(str(REPO_ROOT / "configs" / "accelerate_fsdp.yaml"))
    assert fsdp.distributed_type == "FSDP"
    assert fsdp.fsdp_config["fsdp_transformer_layer_cls_to_wrap"] == "LlamaDecoderLayer"
    # accelerate launch hands fsdp_<key> to the processes as FSDP_<KEY>.
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    for key, value in fsdp.fsdp_config.items():
        monkeypatch.setenv(key.upper(), str(value).lower() if isinstance(value, bool) else str(value))
    assert check_fsdp_setup(cuda=True) is True
