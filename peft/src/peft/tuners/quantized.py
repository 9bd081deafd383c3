"""Frozen base layers stored by bitsandbytes: 8-bit ``Linear8bitLt`` and 4-bit ``Linear4bit`` (QLoRA/QDoRA).

Adapters never touch the packed weights. LoRA only needs the layer's own output
``base_layer(x)``; DoRA also needs the norms of the rows of W, which it reads from the
dequantized weight -- the weight the quantized matmul actually applies -- a block of rows at
a time (8-bit: from the int8 rows and their scales; 4-bit: one transient dequantization,
freed before returning), so no dequantized copy of W outlives the norm computation.

bitsandbytes is imported only when a quantized layer is met.
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch import nn


def quantization_kind(layer: nn.Module) -> str | None:
    """``"8bit"``, ``"4bit"``, or None for an ordinary (float) linear layer."""
    if not type(layer).__module__.startswith("bitsandbytes"):
        return None
    weight_type = type(layer.weight).__name__
    if weight_type == "Params4bit":
        return "4bit"
    if weight_type == "Int8Params" and layer.weight.dtype == torch.int8:
        return "8bit"
    return None  # e.g. Linear8bitLt(has_fp16_weights=True) before quantization: a float weight


def is_quantized(layer: nn.Module) -> bool:
    return quantization_kind(layer) is not None


def int8_row_scales(layer: nn.Module) -> torch.Tensor:
    """The per-row absmax of a Linear8bitLt's int8 weight (W = codes * scales / 127)."""
    # bitsandbytes keeps the per-row absmax on the weight until the first forward, then on layer.state.
    scales = getattr(layer.weight, "SCB", None)
    if scales is None:
        scales = getattr(getattr(layer, "state", None), "SCB", None)
    if scales is None:
        raise RuntimeError(f"{type(layer).__name__} has int8 weights but no row scales (SCB)")
    return scales


def dequantized_row_blocks(layer: nn.Module, dtype: torch.dtype, max_elements: int) -> Iterator[torch.Tensor]:
    """The rows of the dequantized W (out x in) in ``dtype``, at most ``max_elements`` per block."""
    import bitsandbytes.functional as bnb_functional

    kind = quantization_kind(layer)
    rows = max(1, max_elements // layer.in_features)
    if kind == "8bit":
        codes, scales = layer.weight.data, int8_row_scales(layer)
        for start in range(0, codes.shape[0], rows):
            block = bnb_functional.int8_vectorwise_dequant(codes[start : start + rows], scales[start : start + rows])
            yield block.to(dtype)
    elif kind == "4bit":
        # NF4/FP4 blocks run along the flattened weight; dequantize it whole, once, then let it go.
        weight = bnb_functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
        for block in weight.split(rows):
            yield block.to(dtype)
        del weight
    else:
        raise TypeError(f"{type(layer).__name__} is not a bitsandbytes-quantized linear layer")


def check_can_merge(layer: nn.Module) -> None:
    kind = quantization_kind(layer)
    if kind is not None:
        raise RuntimeError(
            f"cannot merge an adapter into {kind} base weights (they would be re-quantized); "
            "load the base model unquantized (fp16/bf16/fp32) to merge, or keep the adapter unmerged"
        )
