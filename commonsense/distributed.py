"""Training in several processes: torchrun / ``accelerate launch`` (DDP), and FSDP through accelerate.

The launchers start one process per GPU and set ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK``;
transformers' Trainer then wraps the model in DDP (or FSDP when accelerate was launched with an
FSDP config, ``ACCELERATE_USE_FSDP=true``) and shards the data. What this module adds:

- who prints and writes: the process with global rank 0 only;
- adapter checkpoints under FSDP (the fork's adapter-only format): FSDP1 keeps every wrapped
  block's tensors -- the frozen base weights and the adapter -- as flat shards, so the adapter is
  gathered before writing and loaded inside ``summon_full_params`` (every process takes part).

FSDP here is FSDP1 (``configs/accelerate_fsdp.yaml``); accelerate only runs it on GPUs (on a
CPU-only machine it quietly falls back to DDP).
"""
from __future__ import annotations

import os

import torch


class DistributedSetupError(ValueError):
    """A multi-process set-up that finetune.py cannot run."""


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", 1))


def is_main_process() -> bool:
    """Global rank 0 (``RANK``; ``LOCAL_RANK`` is 0 once per machine)."""
    return int(os.environ.get("RANK", 0)) == 0


def fsdp_requested() -> bool:
    """Whether ``accelerate launch`` was given an FSDP config."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


# What accelerate's FSDP settings (from the config file, as environment variables) must be:
# (variable, accelerate's default, the value finetune.py needs, why).
_FSDP_REQUIREMENTS = (
    ("FSDP_VERSION", "1", "1", "the adapter checkpoints handle FSDP1 (fsdp_version: 1, configs/accelerate_fsdp.yaml)"),
    ("FSDP_USE_ORIG_PARAMS", "false", "true",
     "frozen base weights and trainable adapters share shards only with fsdp_use_orig_params: true"),
    ("FSDP_STATE_DICT_TYPE", "FULL_STATE_DICT", "FULL_STATE_DICT",
     "adapter checkpoints are gathered whole (fsdp_state_dict_type: FULL_STATE_DICT)"),
)


def check_fsdp_setup(cuda: bool, quantized: bool = False) -> bool:
    """Whether this run shards with FSDP; refuses the FSDP set-ups finetune.py does not handle."""
    if not fsdp_requested():
        return False
    if not cuda:
        if is_main_process():
            print("warning: accelerate runs FSDP only on GPUs; on this CPU-only machine it trains with DDP")
        return False
    if quantized:
        raise DistributedSetupError("FSDP cannot shard an 8-bit/4-bit base model here; drop --load_8bit/--load_4bit or use DDP")
    for variable, default, wanted, why in _FSDP_REQUIREMENTS:
        value = os.environ.get(variable, default)
        if value.lower() != wanted.lower():
            raise DistributedSetupError(f"{variable}={value} is not supported: {why}")
    return True


def _fsdp1_root(model):
    from torch.distributed.fsdp import FullyShardedDataParallel

    return model if isinstance(model, FullyShardedDataParallel) else None


def unwrap(model):
    """The PeftModel inside a DDP or FSDP wrapper (or the model itself)."""
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, (DistributedDataParallel, FullyShardedDataParallel)) else model


def load_adapter(model, directory: str) -> None:
    """Load an adapter folder into ``model`` (a PeftModel, possibly DDP/FSDP-wrapped); under FSDP
    every process must call this."""
    root = _fsdp1_root(model)
    if root is None:
        unwrap(model).load_adapter_state(directory)
        return
    from torch.distributed.fsdp import FullyShardedDataParallel

    # Whole tensors exist only while gathered; writeback copies the loaded values into the shards.
    with FullyShardedDataParallel.summon_full_params(root, writeback=True):
        root.module.load_adapter_state(directory)


def save_adapter(accelerator, model, output_dir: str, should_save: bool, **save_kwargs) -> None:
    """Write ``model``'s adapter to ``output_dir`` from process 0 only. Under FSDP the adapter is
    first gathered from the shards, which takes every process."""
    state_dict = accelerator.get_state_dict(model) if _fsdp1_root(model) is not None else None
    if should_save:
        os.makedirs(output_dir, exist_ok=True)
        unwrap(model).save_pretrained(output_dir, state_dict=state_dict, **save_kwargs)


def fsdp_save_optimizer_and_scheduler(trainer, output_dir: str) -> None:
    """A checkpoint's optimizer and scheduler under FSDP. transformers would also write the whole
    model here (every frozen base weight: tens of GB for a 7B model, every save_step); the
    checkpoint's adapter files already hold all that training changes."""
    from accelerate.utils import save_fsdp_optimizer

    save_fsdp_optimizer(
        trainer.accelerator.state.fsdp_plugin, trainer.accelerator, trainer.optimizer, trainer.model, output_dir
    )
    if trainer.args.should_save:
        torch.save(trainer.lr_scheduler.state_dict(), os.path.join(output_dir, "scheduler.pt"))
