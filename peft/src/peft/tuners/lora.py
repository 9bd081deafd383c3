"""LoRA (Hu et al., 2021): y = W x + s * B A drop(x) + b, with s = lora_alpha / r.

W (out x in) and b are frozen; A (r x in) starts kaiming-uniform (a = sqrt(5)), B (out x r)
starts at zero, so the adapted model starts equal to the base model.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Iterable, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..config import AdapterConfigError, PeftConfig, PeftType
from .dora_kernels import autocast_off
from .tuners_utils import (
    AdapterLayer,
    BaseTuner,
    TargetModulesError,
    accumulation_dtype,
    describe_linear_modules,
    find_targets,
)

# Used when a config leaves target_modules empty (the original fork's defaults).
DEFAULT_TARGET_MODULES = {
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "gpt_neox": ["query_key_value"],
    "opt": ["q_proj", "v_proj"],
    "bloom": ["query_key_value"],
}


@dataclass
class LoraConfig(PeftConfig):
    DEFAULT_PEFT_TYPE: ClassVar[PeftType] = PeftType.LORA
    # Options naming modules: a list of name suffixes or one regex (tuners_utils.module_matches).
    MODULE_LIST_OPTIONS: ClassVar[Tuple[str, ...]] = ("target_modules", "modules_to_save")

    r: int = 8
    target_modules: Optional[Union[List[str], str]] = None
    lora_alpha: int = 8
    lora_dropout: float = 0.0
    merge_weights: bool = False
    fan_in_fan_out: bool = False
    enable_lora: Optional[List[bool]] = None
    bias: str = "none"
    modules_to_save: Optional[List[str]] = None

    def validate(self) -> None:
        super().validate()
        name = type(self).__name__
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise AdapterConfigError(f"{name}: r must be a positive integer, got {self.r!r}")
        if isinstance(self.lora_alpha, bool) or not isinstance(self.lora_alpha, (int, float)) or self.lora_alpha <= 0:
            raise AdapterConfigError(f"{name}: lora_alpha must be a positive number, got {self.lora_alpha!r}")
        if not isinstance(self.lora_dropout, (int, float)) or not 0 <= self.lora_dropout < 1:
            raise AdapterConfigError(f"{name}: lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.bias not in ("none", "all", "lora_only"):
            raise AdapterConfigError(f"{name}: bias must be 'none', 'all' or 'lora_only', got {self.bias!r}")
        if self.fan_in_fan_out:
            raise AdapterConfigError(f"{name}: fan_in_fan_out=True (GPT-2 Conv1D) is not supported")
        if self.enable_lora is not None:
            raise AdapterConfigError(f"{name}: enable_lora (fused qkv MergedLinear) is not supported")
        for option in self.MODULE_LIST_OPTIONS:
            value = getattr(self, option)
            if isinstance(value, tuple):
                setattr(self, option, list(value))
            elif value is not None and not isinstance(value, (str, list)):
                raise AdapterConfigError(f"{name}: {option} must be a list of names or a regex string")

    @property
    def scaling(self) -> float:
        return self.lora_alpha / self.r


def low_rank_delta(lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """s * B A (out x in), in at least fp32. Only merge/unmerge build it (LoRA's and DoRA's);
    the forward never does."""
    dtype = accumulation_dtype(lora_A)
    with autocast_off(lora_A):  # autocast would round the product to half precision
        return (lora_B.to(dtype) @ lora_A.to(dtype)) * scaling


class LoraLinear(AdapterLayer):
    """A frozen ``nn.Linear`` plus the low-rank update s * B A."""

    def __init__(self, base_layer: nn.Linear, r: int, lora_alpha: float, lora_dropout: float = 0.0):
        super().__init__(base_layer)
        self.r = r
        self.lora_alpha = lora_alpha
        self.scaling = lora_alpha / r
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        # Adapter weights are fp32 whatever the base dtype (as the original); on the base's device.
        device = base_layer.weight.device
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=device, dtype=torch.float32)
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def lora_delta(self) -> torch.Tensor:
        return low_rank_delta(self.lora_A.weight, self.lora_B.weight, self.scaling)

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        # Cast the small adapter weights to the activations' dtype, not the activations.
        a = self.lora_A.weight.to(x.dtype)
        b = self.lora_B.weight.to(x.dtype)
        return result + F.linear(F.linear(self.lora_dropout(x), a), b) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        self._check_can_merge()
        weight = self.base_layer.weight
        delta = self.lora_delta()
        weight.copy_((weight.to(delta.dtype) + delta).to(weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        self._check_can_unmerge()
        weight = self.base_layer.weight
        delta = self.lora_delta()
        weight.copy_((weight.to(delta.dtype) - delta).to(weight.dtype))
        self.merged = False

    def extra_repr(self) -> str:
        return f"r={self.r}, lora_alpha={self.lora_alpha}"


def resolve_target_modules(model: nn.Module, config: LoraConfig):
    if config.target_modules:
        return config.target_modules
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in DEFAULT_TARGET_MODULES:
        return DEFAULT_TARGET_MODULES[model_type]
    raise TargetModulesError(
        f"target_modules is empty and there is no default for model type {model_type!r}; "
        f"linear modules in this model: {describe_linear_modules(model)}"
    )


class LoraModel(BaseTuner):
    def _planned_layers(self) -> Iterable[Tuple[str, nn.Linear, dict]]:
        config = self.peft_config
        for name, module in find_targets(self.model, resolve_target_modules(self.model, config), "target_modules"):
            yield name, module, {}

    def _new_layer(self, base: nn.Linear, **kwargs) -> AdapterLayer:
        c = self.peft_config
        return LoraLinear(base, r=c.r, lora_alpha=c.lora_alpha, lora_dropout=c.lora_dropout)
