"""Full fine-tuning (FT), the paper's third method beside LoRA and DoRA.

``finetune.py --adapter_name ft`` runs the same recipe (data, prompt, schedule, checkpoints,
resume, DDP/FSDP) but trains the base model's own linear weights instead of an adapter:

* trained: every ``nn.Linear`` inside the decoder blocks (q/k/v/o and gate/up/down for LLaMA),
  or those ``--target_modules`` names; frozen by choice: the embeddings, the norms and
  ``lm_head`` (tied to the embeddings in many models), so FT changes exactly the matrices the
  paper's weight-decomposition analysis compares;
* fp32 master weights: the base loads in fp32 whatever the device, and the Trainer's fp16/bf16
  autocast does the compute (an fp16 weight cannot take an fp32 optimizer step);
* checkpoints and the final output are plain transformers model folders (safetensors, sharded
  when large) with the tokenizer beside the final one, so they load with
  ``AutoModelForCausalLM.from_pretrained`` and ``commonsense_evaluate.py --adapter FT --base_model DIR``.
"""
from __future__ import annotations

import os
from typing import List, Optional, Sequence, Union

from torch import nn

FT = "ft"
# Written into the output folder so tools can tell an FT run from an adapter run.
FT_MARKER = "full_finetune.json"


class FullFinetuneError(ValueError):
    """An FT option that cannot work."""


def decoder_linear_names(model: nn.Module) -> List[str]:
    """Names of the nn.Linear modules inside the model's decoder blocks (not lm_head)."""
    blocks = _decoder_blocks(model)
    names = []
    for prefix, block in blocks:
        for name, module in block.named_modules():
            if isinstance(module, nn.Linear):
                names.append(f"{prefix}.{name}")
    return names


def _decoder_blocks(model: nn.Module):
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) and name.endswith("layers"):
            return [(f"{name}.{i}", block) for i, block in enumerate(module)]
    raise FullFinetuneError("full fine-tuning: cannot find the model's decoder blocks (a ModuleList named *layers)")


def select_trainable(model: nn.Module, target_modules: Optional[Union[str, Sequence[str]]] = None) -> List[str]:
    """Freeze everything, then make the chosen linear weights (and their biases) trainable.

    ``target_modules``: None for every decoder linear; else names matched as module-name
    suffixes (a list) or a full-match regex (a string), as for adapters. Returns the names.
    """
    from peft.tuners.tuners_utils import module_matches

    linears = decoder_linear_names(model)
    chosen = [n for n in linears if target_modules is None or module_matches(n, target_modules)]
    if not chosen:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in linears})
        raise FullFinetuneError(f"target_modules {target_modules!r} matches no decoder linear layer "
                                f"(they are: {', '.join(leaves)})")
    for param in model.parameters():
        param.requires_grad_(False)
    for name in chosen:
        for param in model.get_submodule(name).parameters():
            param.requires_grad_(True)
    return chosen


def check_options(load_8bit: bool, load_4bit: bool, Wdecompose_target_modules) -> None:
    if load_8bit or load_4bit:
        raise FullFinetuneError("full fine-tuning trains the base weights, which cannot be 8-bit/4-bit; "
                                "drop --load_8bit/--load_4bit")
    if Wdecompose_target_modules:
        raise FullFinetuneError("--Wdecompose_target_modules is a DoRA option; full fine-tuning has no magnitude")


def print_trainable(model: nn.Module, names: List[str]) -> None:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    print(f"full fine-tuning {len(names)} linear layers: trainable params: {trainable:,} || all params: {total:,} "
          f"|| trainable%: {100 * trainable / total:.4f}")


def write_marker(output_dir: str, base_model: str, names: List[str]) -> None:
    from .io import atomic_write_json

    atomic_write_json(os.path.join(output_dir, FT_MARKER),
                      {"method": "FT", "base_model": base_model, "trained_modules": names}, indent=2)
