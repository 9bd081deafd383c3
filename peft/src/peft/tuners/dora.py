r"""DoRA: Weight-Decomposed Low-Rank Adaptation (Liu et al., ICML 2024).

A frozen linear layer y = W x + b (W is out x in, as ``nn.Linear`` stores it) is
re-parameterised as magnitude times direction, and only the direction gets a low-rank update:

    (1)  V  = W + s B A             s = lora_alpha / r,  A: r x in,  B: out x r
    (2)  n  = ||V||                 the L2 norm of each row of V (one value per output)
    (3)  g  = m / n                 m: the learned magnitude, one value per output
    (4)  W' = g * V                 (row-wise scaling) the adapted weight

Paper <-> code: the paper writes W' = m (W0 + BA) / ||W0 + BA||_c with W0 in R^{d x k},
m in R^{1 x k} and ||.||_c the L2 norm of each of the k columns. Here, as in the official
code (``torch.linalg.norm(V, dim=1)`` of the out x in weight), n is the norm of each row, one
per output: the paper's columns are our rows, i.e. its W0 is our W^T (d = in, k = out) and
its BA is our (s B A)^T.

Initialisation: A kaiming-uniform (a = sqrt(5)), B = 0, m = ||W||, so g = 1 and W' = W.

Forward, eval mode or no dropout (one base matmul):

    (5)  y = g * (W x + s B A x) + b

Forward in training with dropout p > 0 (paper-exact, what the original code computes; the
frozen path sees x, the adapted path sees drop(x)):

    (6)  y = W x + (g - 1) * (W drop(x)) + g * s * B A drop(x) + b

``g - 1`` is computed as (m - n) / n, which keeps its small value exact when m ~ n.

``dora_simple=True`` (paper sec. 4.3, the default) treats n as a constant in the backward
pass, saving memory; ``dora_simple=False`` lets the gradient flow through n.

Magnitude-only modules (``Wdecompose_target_modules``) have no A, B: V = W, n = ||W||, and
y = W x + (g - 1) * (W drop(x)) + b.

The norm (2) never builds V (an out x in temporary). It expands the square instead, in fp32:

    n^2 = ||W||^2 + 2 s rowsum(B * (W A^T)) + s^2 rowsum((B (A A^T)) * B)

with ||W||^2 per row cached (W is frozen) and n^2 clamped away from zero (an all-zero row
of V has no direction; its g is m / sqrt(eps), not NaN). Forwards without autograd
(evaluation, generation) also reuse n until A, B or W change; training forwards recompute it
(``DoraLinear.direction_norm`` says why).

Merging writes W <- g V (the eval output is unchanged); unmerging restores W.

An 8-bit or 4-bit (bitsandbytes) base layer -- QDoRA -- keeps its packed weight: W x is the
layer's own quantized product, and the norms read the dequantized W (the W that product
applies): an 8-bit W a block of rows at a time, a 4-bit W dequantized whole, once per norm,
and freed at once, so no dequantized copy of W outlives the norm (see quantized.py).
Such a layer cannot be merged.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Iterable, Iterator, List, Optional, Tuple, Union

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from ..config import PeftType
from .dora_kernels import (
    DoraDropoutLinearFunction,
    DoraLinearFunction,
    autocast_off,
    check_input_dtype,
    dora_linear_inference,
)
from .lora import LoraConfig, LoraModel, low_rank_delta, resolve_target_modules
from .quantized import dequantized_row_blocks, is_quantized
from .sharding import check_full_weight, is_fsdp_view
from .tuners_utils import AdapterLayer, TargetModulesError, accumulation_dtype, find_targets

# n^2 below this is treated as this (an all-zero row of V has no direction to keep).
NORM_SQ_EPS = 1e-12
# Rows of a half-precision W upcast at a time, so fp32 work never copies all of W.
_FP32_CHUNK_ELEMENTS = 1 << 22


@dataclass
class DoraConfig(LoraConfig):
    DEFAULT_PEFT_TYPE: ClassVar[PeftType] = PeftType.DORA
    MODULE_LIST_OPTIONS: ClassVar[Tuple[str, ...]] = LoraConfig.MODULE_LIST_OPTIONS + ("Wdecompose_target_modules",)

    dora_simple: bool = True
    Wdecompose_target_modules: Optional[Union[List[str], str]] = None


# ---- the norm (2), from W without building V ----------------------------------------------
def weight_row_blocks(weight: Union[torch.Tensor, nn.Module]) -> Iterator[torch.Tensor]:
    """W a block of rows at a time, in at least fp32 (W itself when it already is).

    ``weight`` is W, or a bitsandbytes layer whose dequantized W is read block by block;
    a half-precision or quantized W is never upcast all at once.
    """
    if isinstance(weight, nn.Module):
        yield from dequantized_row_blocks(weight, torch.float32, _FP32_CHUNK_ELEMENTS)
        return
    dtype = accumulation_dtype(weight)
    if weight.dtype == dtype:
        yield weight
        return
    rows = max(1, _FP32_CHUNK_ELEMENTS // weight.shape[1])
    for block in weight.split(rows):
        yield block.to(dtype)


def _cat(parts: List[torch.Tensor]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def rowwise_base_times(weight: Union[torch.Tensor, nn.Module], right: torch.Tensor) -> torch.Tensor:
    """``W @ right`` accumulated in at least fp32 (W: out x in, as ``weight_row_blocks`` reads it; right: in x k)."""
    return _cat([block @ right.to(block.dtype) for block in weight_row_blocks(weight)])


def rowwise_sq_norm(weight: Union[torch.Tensor, nn.Module]) -> torch.Tensor:
    """||W||^2 per row in at least fp32 (a reduction: no squared copy of W)."""
    return _cat([torch.linalg.vector_norm(block, dim=1).square() for block in weight_row_blocks(weight)])


def factored_sq_norm(
    weight_sq_norm: torch.Tensor, weight: Union[torch.Tensor, nn.Module], lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float
) -> torch.Tensor:
    """||W + s B A||^2 per row by the expanded square (module docstring): no out x in matrix.

    ``weight_sq_norm`` is ||W||^2 per row; the result has its dtype (fp32 or wider).
    ``weight`` is W or a quantized layer (see ``weight_row_blocks``).
    """
    dtype = weight_sq_norm.dtype
    a = lora_A.to(dtype)
    b = lora_B.to(dtype)
    w_at = rowwise_base_times(weight, a.t()).to(dtype)  # out x r
    cross = (b * w_at).sum(dim=1)
    quad = ((b @ (a @ a.t())) * b).sum(dim=1)
    return weight_sq_norm + (2.0 * scaling) * cross + (scaling * scaling) * quad


class DoraMagnitude(nn.Linear):
    """The magnitude m, one fp32 value per output row, kept as the original fork's
    ``nn.Linear(1, out)`` so checkpoints keep the key ``weight_m_wdecomp.weight`` [out, 1].

    Its forward turns the norm n into (g, g - 1) = (m / n, (m - n) / n), eq. (3). m is read
    only there, which lets FSDP make it a unit of its own and keep it out of mixed precision:
    otherwise FSDP would hand the forward m rounded to fp16/bf16, and g = m / n would carry
    that rounding (see sharding.keep_magnitude_fp32).
    """

    def forward(self, n: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        m = self.weight.view(-1)
        return m / n, (m - n) / n


# ---- what the cached norms are keyed on ----------------------------------------------------
# In-place edits bump a tensor's version counter, but fused optimizers (AdamW(fused=True)) do
# not, so every optimizer step, of any optimizer, also bumps this process-wide count.
_optimizer_steps = 0


def _count_optimizer_step(optimizer, args, kwargs) -> None:
    global _optimizer_steps
    _optimizer_steps += 1


register_optimizer_step_post_hook(_count_optimizer_step)


def optimizer_generation() -> int:
    return _optimizer_steps


def tensor_key(t: torch.Tensor) -> tuple:
    """What identifies a tensor's current contents cheaply (no data is read)."""
    return (t.data_ptr(), t._version, t.dtype, t.device, tuple(t.shape))


class DoraLinear(AdapterLayer):
    """A frozen ``nn.Linear`` with DoRA's magnitude ``m`` and, when r > 0, a LoRA direction update.

    Parameter names follow the original fork so checkpoints interchange:
    ``lora_A.weight`` [r, in], ``lora_B.weight`` [out, r], ``weight_m_wdecomp.weight`` [out, 1].
    ``r = 0`` is the magnitude-only layer.
    """

    def __init__(
        self,
        base_layer: nn.Linear,
        r: int,
        lora_alpha: float,
        lora_dropout: float = 0.0,
        dora_simple: bool = True,
    ):
        super().__init__(base_layer)
        self.r = r
        self.lora_alpha = lora_alpha
        self.scaling = lora_alpha / r if r > 0 else 0.0
        self.dora_simple = dora_simple
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        device = base_layer.weight.device
        # Adapter weights are fp32 whatever the base dtype (as the original).
        self.weight_m_wdecomp = DoraMagnitude(1, self.out_features, bias=False, device=device, dtype=torch.float32)
        if r > 0:
            self.lora_A = nn.Linear(self.in_features, r, bias=False, device=device, dtype=torch.float32)
            self.lora_B = nn.Linear(r, self.out_features, bias=False, device=device, dtype=torch.float32)
        self._weight_sq_norm_cache: Optional[Tuple[tuple, torch.Tensor]] = None
        self._norm_cache: Optional[Tuple[tuple, torch.Tensor]] = None
        self._merge_scale: Optional[torch.Tensor] = None
        # Storage-keyed norm caches; off under FSDP (see sharding.py and set_norm_caching).
        self.cache_norms = True
        # An 8-bit/4-bit base: W x comes from the layer's own quantized matmul (see quantized.py).
        self.base_is_quantized = is_quantized(base_layer)
        self.reset_dora_parameters()

    # ---- parameters --------------------------------------------------------------------
    @property
    def magnitude(self) -> torch.Tensor:
        """m, one fp32 value per output row."""
        return self.weight_m_wdecomp.weight.view(-1)

    @torch.no_grad()
    def reset_dora_parameters(self) -> None:
        if self.r > 0:
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B.weight)
        self.weight_m_wdecomp.weight.copy_(self.weight_sq_norm().sqrt().unsqueeze(1))

    # ---- the norm ----------------------------------------------------------------------
    def _weight_source(self) -> Union[torch.Tensor, nn.Module]:
        """What the norm reads W from: the frozen weight, or the quantized layer itself."""
        return self.base_layer if self.base_is_quantized else self.base_layer.weight.detach()

    def _check_full_weight(self) -> None:
        # Packed quantized weights have their own shapes; a compiled graph checks nothing at run time.
        if not self.base_is_quantized and not torch.compiler.is_compiling():
            check_full_weight(self.base_layer.weight, self.out_features, self.in_features)

    def _norms_cacheable(self) -> bool:
        """Whether the storage-keyed caches can be trusted (see sharding.py for FSDP)."""
        # A compiled graph cannot branch on storage pointers.
        if torch.compiler.is_compiling() or not self.cache_norms:
            return False
        return self.base_is_quantized or not is_fsdp_view(self.base_layer.weight)

    def weight_sq_norm(self) -> torch.Tensor:
        """||W||^2 per row (fp32), computed once and reused while W is unchanged (W is frozen)."""
        self._check_full_weight()
        weight = self.base_layer.weight
        if not self._norms_cacheable():
            with torch.no_grad(), autocast_off(weight):
                return rowwise_sq_norm(self._weight_source())
        key = tensor_key(weight)
        cache = self._weight_sq_norm_cache
        if cache is None or cache[0] != key:
            with torch.no_grad(), autocast_off(weight):
                cache = (key, rowwise_sq_norm(self._weight_source()))
            self._weight_sq_norm_cache = cache
        return cache[1]

    def direction_norm(self) -> torch.Tensor:
        """n = ||W + s B A|| per row (2), fp32; a constant for autograd when dora_simple.

        Only forwards without autograd (evaluation, generation) reuse a cached n: see below.
        """
        if self.r == 0:  # V = W, clamped as below
            return self.weight_sq_norm().clamp_min(NORM_SQ_EPS).sqrt()
        if torch.is_grad_enabled():
            if not self.dora_simple:
                return self._compute_direction_norm()
            with torch.no_grad():
                return self._compute_direction_norm()
        # Why only here (benchmarks/norm_cache.py -> results/norm_cache_cpu*.json, CPU, r = 32):
        # computing n takes about as long as a whole generation step's forward with n cached
        # (0.9-1.2x; 1-8x over a 4-bit base) and 2-11% of an evaluation batch's, but only
        # 1-1.4% of a SmolLM2-shaped training micro-batch (5% of a 7B-shaped one at 512 tokens,
        # falling as 1 / tokens), saved on k - 1 of k micro-batches at best (never with one per
        # step). So training forwards recompute n and never depend on this cache. The key
        # changes when A, B or W is replaced or edited in place, or when any optimizer steps
        # (fused optimizers leave version counters alone).
        if not self._norms_cacheable():
            return self._compute_direction_norm()
        key = (
            tensor_key(self.lora_A.weight),
            tensor_key(self.lora_B.weight),
            tensor_key(self.base_layer.weight),
            optimizer_generation(),
        )
        if self._norm_cache is None or self._norm_cache[0] != key:
            self._norm_cache = (key, self._compute_direction_norm())
        return self._norm_cache[1]

    def _compute_direction_norm(self) -> torch.Tensor:
        """n from the expanded square (module docstring), clamped: n^2 >= NORM_SQ_EPS."""
        with autocast_off(self.lora_B.weight):  # fp32 (or wider), whatever autocast says
            sq = factored_sq_norm(
                self.weight_sq_norm(), self._weight_source(), self.lora_A.weight, self.lora_B.weight, self.scaling
            )
            return sq.clamp_min(NORM_SQ_EPS).sqrt()

    def invalidate_norm_cache(self) -> None:
        """Forget cached norms (only needed after editing weights through ``.data``)."""
        self._norm_cache = None
        self._weight_sq_norm_cache = None

    # ---- forward -----------------------------------------------------------------------
    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The module docstring's equations, computed by ``dora_kernels`` (one base matmul
        without dropout, two with it; no out x in temporary).

        Precision (``dora_kernels``' rule): m, n, g stay fp32; the rest computes in the dtype
        autocast would give the base ``nn.Linear`` (else the input's), and so does the output.
        """
        self._check_full_weight()
        weight, bias = self.base_layer.weight, self.base_layer.bias
        lora_A = self.lora_A.weight if self.r > 0 else None
        lora_B = self.lora_B.weight if self.r > 0 else None
        dropout_active = self.training and not isinstance(self.lora_dropout, nn.Identity)
        with autocast_off(x):
            g, g_minus_1 = self.weight_m_wdecomp(self.direction_norm())  # (2), (3): fp32
        if self.base_is_quantized:
            return self._quantized_forward(x, g, g_minus_1, dropout_active)
        dtype = check_input_dtype(x, weight)
        with autocast_off(x):
            x = x.to(dtype)  # autograd casts the gradient back to x's dtype
            bias = bias.to(dtype) if bias is not None else None
            if not dropout_active:  # (5) y = g * (W x + s B A x) + b
                if not torch.is_grad_enabled():
                    return dora_linear_inference(x, weight, bias, lora_A, lora_B, self.scaling, g)
                return DoraLinearFunction.apply(x, weight, bias, lora_A, lora_B, g, self.scaling)
            # (6) y = W x + (g - 1) * (W drop(x)) + g * s B A drop(x) + b, with g - 1 = (m - n) / n
            x_drop = self.lora_dropout(x)
            return DoraDropoutLinearFunction.apply(
                x, x_drop, weight, bias, lora_A, lora_B, g, g_minus_1, self.scaling
            )

    def _quantized_forward(self, x, g, g_minus_1, dropout_active: bool) -> torch.Tensor:
        """The same equations over a bitsandbytes base, with W x = base_layer(x) - b (plain autograd)."""
        bias = self.base_layer.bias
        base_out = self.base_layer(x)  # W x + b
        dtype = base_out.dtype

        def low_rank(inputs):  # s B A inputs
            if self.r == 0:
                return None
            a, b = self.lora_A.weight.to(inputs.dtype), self.lora_B.weight.to(inputs.dtype)
            return nn.functional.linear(nn.functional.linear(inputs, a), b) * self.scaling

        if not dropout_active:  # (5) y = g * (W x + s B A x) + b
            h = base_out - bias if bias is not None else base_out
            delta = low_rank(x)
            if delta is not None:
                h = h + delta.to(dtype)
            # g * h as h + (g - 1) h: rounded to the activation dtype, the small g - 1 keeps its
            # precision where g would not (these autograd ops stay in one dtype)
            y = h + g_minus_1.to(dtype) * h
            return y + bias if bias is not None else y
        # (6) y = W x + (g - 1) * (W drop(x)) + g * s B A drop(x) + b
        x_drop = self.lora_dropout(x)
        dropped = self.base_layer(x_drop)
        if bias is not None:
            dropped = dropped - bias
        y = base_out + g_minus_1.to(dtype) * dropped
        delta = low_rank(x_drop)
        return y + g.to(dtype) * delta.to(dtype) if delta is not None else y

    def lora_delta(self) -> torch.Tensor:
        return low_rank_delta(self.lora_A.weight, self.lora_B.weight, self.scaling)

    # ---- merge -------------------------------------------------------------------------
    @torch.no_grad()
    def merge(self) -> None:
        """W <- g * (W + s B A), eq. (4)."""
        self._check_can_merge()
        weight = self.base_layer.weight
        with autocast_off(weight):
            g, _ = self.weight_m_wdecomp(self.direction_norm())
            v = weight.to(g.dtype)
            if self.r > 0:
                v = v + self.lora_delta().to(g.dtype)
            weight.copy_((g.unsqueeze(1) * v).to(weight.dtype))
        self._merge_scale = g
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W <- W / g - s B A, with the g used by merge."""
        self._check_can_unmerge()
        weight = self.base_layer.weight
        g = self._merge_scale
        with autocast_off(weight):
            w = weight.to(g.dtype) / g.unsqueeze(1)
            if self.r > 0:
                w = w - self.lora_delta().to(g.dtype)
            weight.copy_(w.to(weight.dtype))
        self._merge_scale = None
        self.merged = False

    def extra_repr(self) -> str:
        return f"r={self.r}, lora_alpha={self.lora_alpha}, dora_simple={self.dora_simple}"


class DoraModel(LoraModel):
    """Adapts ``target_modules`` with full DoRA and ``Wdecompose_target_modules`` with magnitude only."""

    def _planned_layers(self) -> Iterable[Tuple[str, nn.Linear, dict]]:
        config = self.peft_config
        magnitude_only = find_targets(self.model, config.Wdecompose_target_modules, "Wdecompose_target_modules")
        if config.target_modules or not magnitude_only:
            full = find_targets(self.model, resolve_target_modules(self.model, config), "target_modules")
        else:
            full = []
        both = sorted({n for n, _ in full} & {n for n, _ in magnitude_only})
        if both:
            raise TargetModulesError(
                f"module {both[0]} is in both target_modules and Wdecompose_target_modules; pick one"
            )
        for name, module in full:
            yield name, module, {"r": config.r}
        for name, module in magnitude_only:
            yield name, module, {"r": 0}

    def _new_layer(self, base: nn.Linear, r: int = 0, **kwargs) -> AdapterLayer:
        c = self.peft_config
        return DoraLinear(base, r=r, lora_alpha=c.lora_alpha, lora_dropout=c.lora_dropout, dora_simple=c.dora_simple)
