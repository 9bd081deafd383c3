"""``PeftModel``: a base model plus one adapter; save, load, merge, disable; ``get_peft_model``."""
from __future__ import annotations

import contextlib
import os
from typing import Optional

import torch
from torch import nn

from .config import PeftConfig
from .mapping import PEFT_TYPE_TO_TUNER
from .utils.hub import resolve_adapter_dir
from .utils.save_and_load import (
    get_peft_model_state_dict,
    load_adapter_weights,
    read_adapter,
    set_peft_model_state_dict,
    write_adapter,
)


class PeftModel(nn.Module):
    """Holds the tuner as ``base_model``; the wrapped transformer is ``base_model.model``."""

    def __init__(self, model: nn.Module, peft_config: PeftConfig):
        super().__init__()
        if peft_config.base_model_name_or_path is None:
            peft_config.base_model_name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None)
        self.peft_config = peft_config
        self.base_model = PEFT_TYPE_TO_TUNER[peft_config.peft_type](model, peft_config)

    # ---- the wrapped model's interface ----------------------------------------------
    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None, **kwargs):
        # Named arguments (not *args) so transformers.Trainer keeps these dataset columns.
        return self.get_base_model()(
            input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds, labels=labels, **kwargs
        )

    def generate(self, *args, **kwargs):
        return self.get_base_model().generate(*args, **kwargs)

    def get_base_model(self) -> nn.Module:
        return self.base_model.model

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model.model, name)

    # ---- adapter state ----------------------------------------------------------------
    @contextlib.contextmanager
    def disable_adapter(self):
        """Run the base model alone inside the ``with`` block."""
        if any(layer.merged for layer in self.base_model.adapter_layers()):
            raise RuntimeError("disable_adapter() on a merged model: unmerge_adapter() first")
        self.base_model.set_adapters_enabled(False)
        try:
            yield
        finally:
            self.base_model.set_adapters_enabled(True)

    def merge_adapter(self) -> None:
        self.base_model.merge_adapter()

    def unmerge_adapter(self) -> None:
        self.base_model.unmerge_adapter()

    def merge_and_unload(self) -> nn.Module:
        """Fold the adapter into the base weights and return the plain base model."""
        return self.base_model.merge_and_unload()

    def unload(self) -> nn.Module:
        return self.base_model.unload()

    def get_nb_trainable_parameters(self):
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.parameters())
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable} || all params: {total} || trainable%: {100 * trainable / total}")

    # ---- files ------------------------------------------------------------------------
    def save_pretrained(
        self, save_directory: str, safe_serialization: bool = False, state_dict=None, hf_format: bool = False, **_
    ) -> None:
        """Write ``adapter_config.json`` and ``adapter_model.bin`` (or ``.safetensors``).

        ``hf_format=True`` writes HF peft's format instead (``use_dora``, ``lora_magnitude_vector``,
        safetensors; see ``utils/hf_format.py``), which HF peft's ``PeftModel.from_pretrained`` loads.
        """
        if os.path.isfile(save_directory):
            raise ValueError(f"save_pretrained needs a folder, {save_directory} is a file")
        weights = get_peft_model_state_dict(self, state_dict)
        write_adapter(
            self.peft_config, weights, save_directory, hf_format=hf_format, safe_serialization=safe_serialization
        )

    @classmethod
    def from_pretrained(
        cls, model: nn.Module, model_id: str, is_trainable: bool = False, subfolder: Optional[str] = None, **_
    ) -> "PeftModel":
        """Attach the adapter saved in ``model_id`` (a folder, or a hub repo id) to ``model``.

        The folder may also be an HF peft LoRA/DoRA adapter (``hf_format.is_hf_config``); it
        loads as this fork's LoraConfig / DoraConfig (dora_simple=True, as HF peft computes).
        Extra keyword arguments of the original API (``torch_dtype``, ``device_map``) are
        accepted and ignored: adapters load fp32 onto the device of the layers they adapt.
        """
        directory = resolve_adapter_dir(model_id, subfolder)
        config, weights = read_adapter(directory)
        config.inference_mode = not is_trainable
        peft_model = cls(model, config)
        set_peft_model_state_dict(peft_model, weights)
        if not is_trainable:
            peft_model.eval()
            for param in peft_model.parameters():
                param.requires_grad_(False)
        return peft_model

    def load_adapter_state(self, directory: str) -> None:
        """Replace this model's adapter tensors with those saved in ``directory`` (strict)."""
        set_peft_model_state_dict(self, load_adapter_weights(directory))


def get_peft_model(model: nn.Module, peft_config: PeftConfig) -> PeftModel:
    """Wrap ``model`` with the adapter ``peft_config`` describes (only the adapter trains)."""
    return PeftModel(model, peft_config)


def adapter_state_tensors(model: PeftModel) -> dict:
    """A detached fp32 copy of the adapter's tensors (for comparisons and checkpoints)."""
    return {k: v.detach().to(torch.float32).clone() for k, v in get_peft_model_state_dict(model).items()}


class PeftMixedModel(nn.Module):
    """Not supported by this fork; the name exists because transformers imports it.

    transformers finds any importable ``peft`` (this fork, first on sys.path) and imports
    ``PeftModel`` and ``PeftMixedModel`` from it; then ``Trainer`` treats our ``PeftModel``
    as a PEFT model (``get_base_model()``, ``base_model.model``), which this fork provides.
    """

    def __init__(self, *args, **kwargs):
        raise NotImplementedError("mixing adapter types is not supported by this fork")
