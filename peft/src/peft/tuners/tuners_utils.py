"""What LoRA and DoRA share: the adapter-layer base class and the module matching/replacement.

Matching rules (the original fork's): a *list* of names matches module-name suffixes
(``"q_proj"`` matches ``model.layers.0.self_attn.q_proj``); a *string* is a regular
expression that must match the whole module name. Only ``nn.Linear`` modules are adapted.
"""
from __future__ import annotations

import re
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .quantized import check_can_merge


class TargetModulesError(ValueError):
    """target_modules (or Wdecompose_target_modules) selected nothing usable."""


def accumulation_dtype(t: torch.Tensor) -> torch.dtype:
    """fp32 for half-precision tensors; fp64 stays fp64 (exact references in tests)."""
    return torch.promote_types(t.dtype, torch.float32)


def module_matches(name: str, targets: Union[str, Sequence[str], None]) -> bool:
    if not targets:
        return False
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def linear_module_names(model: nn.Module) -> List[str]:
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]


def describe_linear_modules(model: nn.Module) -> str:
    """A short list of the model's adaptable module names, for error messages."""
    leaves = sorted({name.rsplit(".", 1)[-1] for name in linear_module_names(model)})
    return ", ".join(leaves) if leaves else "(none: the model has no nn.Linear modules)"


def find_targets(
    model: nn.Module, targets: Union[str, Sequence[str], None], option: str
) -> List[Tuple[str, nn.Linear]]:
    """The (name, module) pairs ``targets`` selects; a clear error if it selects nothing."""
    if not targets:
        return []
    found = [(n, m) for n, m in model.named_modules() if module_matches(n, targets)]
    not_linear = [n for n, m in found if not isinstance(m, nn.Linear)]
    if not_linear:
        raise TargetModulesError(
            f"{option} {targets!r} selects modules that are not nn.Linear "
            f"(first: {not_linear[0]} is {type(dict(found)[not_linear[0]]).__name__}); "
            f"linear modules in this model: {describe_linear_modules(model)}"
        )
    if not found:
        raise TargetModulesError(
            f"{option} {targets!r} matches no module of the model; "
            f"linear modules in this model: {describe_linear_modules(model)}"
        )
    return found


def replace_module(root: nn.Module, name: str, new_module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new_module)


class AdapterLayer(nn.Module):
    """A frozen ``nn.Linear`` (``base_layer``) plus adapter weights.

    Subclasses implement ``adapter_forward``, ``merge`` and ``unmerge``. The base layer is
    kept as a child so ``merge_and_unload`` can put the original module object back.
    """

    def __init__(self, base_layer: nn.Linear):
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"adapter layers wrap nn.Linear, got {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.disable_adapters = False
        self.merged = False
        base_layer.weight.requires_grad_(False)

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return self.base_layer.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.disable_adapters or self.merged:
            return self.base_layer(x)
        return self.adapter_forward(x)

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _check_can_merge(self) -> None:
        check_can_merge(self.base_layer)
        if self.merged:
            raise RuntimeError(
                f"{type(self).__name__} is already merged; merging twice would corrupt the base "
                "weight. Call unmerge() first."
            )

    def _check_can_unmerge(self) -> None:
        if not self.merged:
            raise RuntimeError(f"{type(self).__name__} is not merged; nothing to unmerge")


class BaseTuner(nn.Module):
    """Wraps a model, replaces its target ``nn.Linear`` modules by adapter layers, and freezes
    everything else. ``self.model`` is the wrapped model, so adapter keys read
    ``base_model.model.<module path>...`` once a ``PeftModel`` holds this as ``base_model``.
    """

    def __init__(self, model: nn.Module, config):
        super().__init__()
        self.model = model
        self.peft_config = config
        for param in model.parameters():
            param.requires_grad_(False)
        replaced = self._inject_adapters()
        if not replaced:
            raise TargetModulesError(
                f"no module selected for the adapter; linear modules in this model: "
                f"{describe_linear_modules(model)}"
            )
        self._mark_trainable()

    # ---- subclasses say which modules become which layer ----------------------------
    def _planned_layers(self) -> Iterable[Tuple[str, nn.Linear, dict]]:  # pragma: no cover
        raise NotImplementedError

    def _new_layer(self, base: nn.Linear, **kwargs) -> AdapterLayer:  # pragma: no cover
        raise NotImplementedError

    def _inject_adapters(self) -> List[str]:
        replaced = []
        for name, module, kwargs in list(self._planned_layers()):
            replace_module(self.model, name, self._new_layer(module, **kwargs))
            replaced.append(name)
        return replaced

    def _mark_trainable(self) -> None:
        bias = self.peft_config.bias
        for layer in self.adapter_layers():
            for pname, param in layer.named_parameters():
                if not pname.startswith("base_layer."):
                    param.requires_grad_(True)
            if bias == "lora_only" and layer.base_layer.bias is not None:
                layer.base_layer.bias.requires_grad_(True)
        if bias == "all":
            for name, param in self.model.named_parameters():
                if name.endswith("bias"):
                    param.requires_grad_(True)
        for name, module in self.model.named_modules():
            if module_matches(name, self.peft_config.modules_to_save):
                for param in module.parameters():
                    param.requires_grad_(True)

    # ---- helpers --------------------------------------------------------------------
    def adapter_layers(self) -> List[AdapterLayer]:
        return [m for m in self.model.modules() if isinstance(m, AdapterLayer)]

    def named_adapter_layers(self) -> Dict[str, AdapterLayer]:
        return {n: m for n, m in self.model.named_modules() if isinstance(m, AdapterLayer)}

    def set_adapters_enabled(self, enabled: bool) -> None:
        for layer in self.adapter_layers():
            layer.disable_adapters = not enabled

    def merge_adapter(self) -> None:
        for layer in self.adapter_layers():
            layer.merge()

    def unmerge_adapter(self) -> None:
        for layer in self.adapter_layers():
            layer.unmerge()

    def merge_and_unload(self) -> nn.Module:
        """Fold every adapter into its base weight and put the plain ``nn.Linear`` back."""
        for name, layer in list(self.named_adapter_layers().items()):
            if not layer.merged:
                layer.merge()
            replace_module(self.model, name, layer.base_layer)
        return self.model

    def unload(self) -> nn.Module:
        """Drop the adapters without merging (unmerging first where merged)."""
        for name, layer in list(self.named_adapter_layers().items()):
            if layer.merged:
                layer.unmerge()
            replace_module(self.model, name, layer.base_layer)
        return self.model

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)
