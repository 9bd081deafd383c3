"""Preparing a base model for adapter training."""
from __future__ import annotations

import torch
from torch import nn


def _is_quantized(model: nn.Module) -> bool:
    return bool(getattr(model, "is_loaded_in_8bit", False) or getattr(model, "is_loaded_in_4bit", False))


def prepare_model_for_kbit_training(
    model: nn.Module,
    use_gradient_checkpointing: bool = True,
    layer_norm_names=("layer_norm", "layernorm", "norm"),
    output_embedding_layer_name: str = "lm_head",
) -> nn.Module:
    """Freeze the base model and make it trainable through adapters.

    - every base parameter is frozen;
    - for 8-bit/4-bit bases, norm weights (small) are upcast to fp32 for stable training;
    - ``use_gradient_checkpointing=True`` really enables checkpointing, for fp32/fp16/bf16
      bases too (the original fork only did so for 8-bit models, so the flag did nothing
      otherwise), and makes the embeddings' output require grad, which re-entrant or not,
      checkpointing needs when the inputs of a block are otherwise all frozen.
    """
    quantized = _is_quantized(model)
    for name, param in model.named_parameters():
        param.requires_grad_(False)
        if quantized and param.ndim == 1 and any(n in name for n in layer_norm_names):
            param.data = param.data.to(torch.float32)
    if use_gradient_checkpointing:
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
        enable_checkpointing(model)
        if hasattr(model, "config"):
            model.config.use_cache = False  # the KV cache is useless in training and clashes with checkpointing
    return model


def enable_checkpointing(model: nn.Module) -> None:
    """Non-reentrant activation checkpointing, whichever name this transformers gives it."""
    no_reentrant = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=no_reentrant)
    elif hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=no_reentrant)


# The original fork's name.
prepare_model_for_int8_training = prepare_model_for_kbit_training
