r"""DoRA layers under FSDP (PyTorch's fully sharded data parallel, versions 1 and 2).

Two things about FSDP matter to a DoRA layer:

1. The norm n = ||W + s B A|| is per *row* of W, so it needs every full row. Inside the
   forward of an FSDP unit (e.g. a wrapped ``LlamaDecoderLayer``) FSDP shows each module its
   unsharded weight, and the layer computes from it as usual. Outside that forward -- or when
   the adapted ``nn.Linear`` itself is wrapped, so its weight is never unsharded around the
   DoRA code -- the weight is a shard: a flat 1-D piece of a FlatParameter (FSDP1), a freed
   storage (FSDP1 without ``use_orig_params``), or a DTensor holding some rows (FSDP2).
   :func:`check_full_weight` turns all of those into a clear error instead of a wrong norm.

2. The layer caches ||W||^2, and n for forwards without autograd, keyed on the tensors'
   storage address and version counter (``dora.tensor_key``), which is sound for a
   persistent parameter: any in-place change bumps its version. Under FSDP it is not. The
   unsharded weight lives in a buffer that FSDP frees after each forward and all-gathers
   again for the next; the allocator can hand back the same address, and the all-gather does
   not bump the version. Loading new adapter values (a best-checkpoint reload, a resume)
   writes the *shards*, so the next forward can present an identical key for different
   values and reuse a stale norm (seen on CPU with FSDP1: tests/test_distributed.py). So a
   layer under FSDP recomputes its norms every forward. That costs one pass over W for
   ||W||^2 plus W A^T (out x in x r), about (1 + r) / tokens of the layer's main matmul:
   well under 1% at the recipe's sizes.

   FSDP1's unsharded weight is recognised by itself (:func:`is_fsdp_view`); FSDP2's is an
   ordinary parameter, so code that applies ``fully_shard`` calls ``set_norm_caching(model,
   False)`` first (``commonsense.training`` does so whenever accelerate runs FSDP).

3. FSDP's mixed precision casts every parameter of a unit to the compute dtype for its
   forward, the magnitude m included, so g = m / n would see m rounded to fp16 (2^-11) or
   bf16 (2^-8): at initialisation g would miss 1 by up to that much, and updates to m smaller
   than one rounding would not reach the forward. The magnitude is a module of its own
   (``DoraMagnitude``), and :func:`keep_magnitude_fp32` lists its class among those FSDP1
   leaves in full precision: FSDP then wraps each one as a small unit of its own, without
   mixed precision, and g stays m / n in fp32 as everywhere else.
"""
from __future__ import annotations

import torch
from torch import nn


class ShardedWeightError(RuntimeError):
    """A DoRA layer met a sharded base weight, from which its row norms cannot be computed."""


def _is_dtensor(t: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed support
        return False
    return isinstance(t, DTensor)


def is_fsdp_view(weight: torch.Tensor) -> bool:
    """True for the unsharded weight FSDP1 lends a module: a plain tensor view of its flat
    parameter during forward/backward (not the module's ``nn.Parameter``), or an original
    parameter marked ``_fsdp_flattened`` (inside ``summon_full_params``)."""
    return not isinstance(weight, nn.Parameter) or bool(getattr(weight, "_fsdp_flattened", False))


def _storage_holds(t: torch.Tensor) -> bool:
    """Whether t's storage is big enough for its view (FSDP frees unsharded storage to 0 bytes)."""
    if t.is_meta or t.numel() == 0:
        return True
    last = t.storage_offset() + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
    return t.untyped_storage().nbytes() >= (last + 1) * t.element_size()


def check_full_weight(weight: torch.Tensor, out_features: int, in_features: int) -> None:
    """Raise ShardedWeightError unless ``weight`` is the whole out x in matrix, in local memory."""
    if _is_dtensor(weight):
        found = f"a DTensor ({weight.placements}), i.e. FSDP2 shards"
    elif tuple(weight.shape) != (out_features, in_features):
        found = f"shape {tuple(weight.shape)}, i.e. an FSDP shard"
    elif not _storage_holds(weight):
        found = "a freed storage, i.e. an FSDP-resharded weight"
    else:
        return
    raise ShardedWeightError(
        f"DoRA needs the full rows of the base weight ({out_features} x {in_features}) but got {found}. "
        "Wrap whole blocks (e.g. LlamaDecoderLayer) with FSDP, never the adapted nn.Linear alone, and "
        "merge or compute norms outside forward only inside FSDP.summon_full_params / after unshard()."
    )


def set_norm_caching(model: nn.Module, enabled: bool) -> int:
    """Turn the storage-keyed norm caches of every DoRA layer in ``model`` on or off (off before
    FSDP2's ``fully_shard``; see the module docstring). Returns the number of layers changed."""
    layers = [m for m in model.modules() if hasattr(m, "cache_norms")]
    for layer in layers:
        layer.cache_norms = enabled
        layer.invalidate_norm_cache()
    return len(layers)


def keep_magnitude_fp32(mixed_precision):
    """Make an FSDP1 ``MixedPrecision`` policy leave DoRA's magnitudes in fp32 (point 3 above).

    Returns the policy (changed in place); None, or a policy without module classes to ignore
    (FSDP2's), is returned unchanged.
    """
    if mixed_precision is None or not hasattr(mixed_precision, "_module_classes_to_ignore"):
        return mixed_precision
    from .dora import DoraMagnitude  # here: dora imports this module

    classes = tuple(mixed_precision._module_classes_to_ignore)
    if DoraMagnitude not in classes:
        mixed_precision._module_classes_to_ignore = classes + (DoraMagnitude,)
    return mixed_precision
