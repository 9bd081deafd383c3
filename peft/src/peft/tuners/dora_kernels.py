r"""The DoRA linear layer's forward and backward, hand-written for speed and memory.

``dora.py`` states the math; this module computes it with as little work and memory as
the formula allows. Notation: x is [T, in] (leading dims flattened), W [out, in] frozen,
A [r, in], B [out, r], s the scaling, g = m / n and g1 = (m - n) / n = g - 1 (both [out],
computed by the caller so autograd carries their gradients on to m, and to A, B through
n when ``dora_simple=False``).

Without dropout (and always in eval mode) -- one base matmul, as LoRA:

    forward   h = x W^T + s (x A^T) B^T ;  y = g * h + b
    backward  grad_g = sum_T(dy * h)
              dyg = dy * g
              grad_x = dyg W + s (dyg B) A ;  grad_B = s dyg^T (x A^T) ;  grad_A = s (dyg B)^T x

grad_g needs h. With a bias (or inside torch.compile), h is kept. Without one, the output
y = g * h is kept instead and grad_g = sum_T(dy * y) / g, so h costs no memory beyond the
output the caller holds anyway. y / g is h to the dtype's precision (up to an absolute error
below sqrt(tiny) * eps, tiny the dtype's smallest normal) wherever |g| >= sqrt(tiny); where
some |g| is smaller (a zero magnitude, say), backward recomputes h = x W^T + s (x A^T) B^T
from the tensors it holds anyway, one extra matmul in that rare case only. Whether that case
holds is decided on the device in forward and read on the host only in backward
(``SmallMagnitudeFlag``), so forward never waits for the GPU.

With dropout (paper-exact; x_d = drop(x) comes from the caller's dropout module, so its
mask and backward stay the module's own):

    forward   p = x_d W^T ;  q = s (x_d A^T) B^T ;  y = x W^T + g1 * p + g * q + b
    backward  grad_x = dy W ;  grad_x_d = (g1 * dy) W + s ((g * dy) B) A
              grad_g = sum_T(dy * (p + q)),  grad_A, grad_B as above with x_d

Two base matmuls forward and two backward are inherent to this formula (the frozen path
sees x, the adapted one x_d). g and g1 differ by a constant, so they have the same
gradient with respect to everything upstream: the function returns the combined
gradient for g and none for g1, which gives m, A and B exactly their true gradients.

Magnitude-only layers are the same with no A, B (q = 0).

Precision and autocast -- one rule for ``DoraLinearFunction``, ``DoraDropoutLinearFunction``
and ``dora_linear_inference``, on the torch and the Triton path alike:

    The layer computes in the dtype autocast would give the ``nn.Linear`` it replaces:
    c = autocast's dtype for x's device when autocast is on there (fp64 inputs excepted, as
    autocast leaves them alone), else x's dtype, which must then be W's dtype (as for
    ``nn.Linear``). x, x_d and b are cast to c by the caller (autograd records the casts, so
    an fp32 x gets an fp32 gradient); W, A and B are cast to c inside, for the matmuls only
    (W again in backward rather than kept, so no extra copy of W lives until then). The
    output is in c. g and g1 stay fp32 (the norm behind them is computed in fp32 with
    autocast off), and every elementwise pass applies them in fp32 arithmetic and rounds the
    result once to c: Triton in fp32 registers, torch by mixed-dtype ops (never g rounded to
    c: 1 + 2^-9 does not exist in bf16, so a rounded g would erase small magnitude updates).
    Forward and backward run with autocast off (``autocast_off``), whatever autocast state
    the backward is called in. Gradients come back in each input's own dtype: fp32 for the
    adapter's A, B and, through g, m.

This is ``torch.amp.custom_fwd(cast_inputs=c)`` with two refinements, chosen after reading
what torch and HF peft do: g is not cast (custom_fwd would cast every floating input, which
rounds g as above), and W is cast inside rather than before (custom_fwd's cast of a frozen W
would be saved for backward). HF peft's DoRA runs as plain ops under autocast, which also
puts the matmuls in c and keeps the norm in fp32.
"""
from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F

# The elementwise passes between the matmuls (Triton on CUDA, torch elsewhere)
from .dora_triton import compose_backward, compose_dropout_forward, scale_columns_


# ---- precision --------------------------------------------------------------------------------
def autocast_enabled(device_type: str) -> bool:
    """Whether autocast is on for this device type (never for types autocast does not know, e.g. meta)."""
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:
        return False


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the layer computes in for input x (the module docstring's rule)."""
    device_type = x.device.type
    if x.dtype != torch.float64 and autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


def autocast_off(t: torch.Tensor):
    """A context in which autocast is off for t's device (a no-op when it already is)."""
    device_type = t.device.type
    if autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _autocast_off_in(method):
    """Run an autograd Function's forward or backward with autocast off for the device of its first
    tensor argument (x, or dy), whatever autocast state it is called in (the module docstring's rule)."""

    @functools.wraps(method)
    def run(ctx, first, *args):
        with autocast_off(first):
            return method(ctx, first, *args)

    return run


class PrecisionError(TypeError):
    """Input and base weight dtypes that no rule can reconcile (outside autocast)."""


def check_input_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The compute dtype for x, or a clear error where ``nn.Linear`` would fail too."""
    if weight.dtype != x.dtype and not autocast_enabled(x.device.type):
        raise PrecisionError(
            f"DoRA layer: input is {x.dtype} but the base weight is {weight.dtype}; cast the model to one "
            "dtype or run under torch.autocast (as nn.Linear requires)"
        )
    return compute_dtype(x)


# ---- helpers ------------------------------------------------------------------------------
def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


def dora_linear_inference(x, weight, bias, lora_A, lora_B, scaling, g) -> torch.Tensor:
    """y = g * (x W^T + s (x A^T) B^T) + b with no autograd graph, in place where possible.

    x and bias are already in the compute dtype; W, A, B are cast to it here.
    """
    dtype = x.dtype
    with autocast_off(x):
        h = F.linear(x, weight.to(dtype))
        if lora_A is not None:
            xa = F.linear(x, lora_A.to(dtype))
            h = h.add_(F.linear(xa, lora_B.to(dtype)), alpha=scaling)
        return scale_columns_(h, g, bias)


class SmallMagnitudeFlag:
    """Whether some |g| < sqrt(tiny) of ``dtype`` (so y / g does not give h back): computed on the
    device in forward, read on the host in backward only.

    On CUDA the flag is copied without blocking into pinned host memory, with an event recorded
    right after the copy on its stream; ``read`` waits for that event, i.e. only for the work
    queued up to this layer's forward, long finished when its backward runs (``.item()`` in
    forward would stall the queue once per layer). On other devices the flag is read directly.
    """

    __slots__ = ("_value", "_copied")

    def __init__(self, g: torch.Tensor, dtype: torch.dtype):
        small = (g.detach().abs() < torch.finfo(dtype).tiny ** 0.5).any()
        self._copied = None
        copy_to_host = _ASYNC_HOST_COPY.get(small.device.type)
        if copy_to_host is not None:
            small, self._copied = copy_to_host(small)
        self._value = small

    def read(self) -> bool:
        if self._copied is not None:
            self._copied.synchronize()
        return bool(self._value)


def _copy_to_host_async(flag: torch.Tensor):
    """(pinned host copy of a CUDA scalar, the event that marks the copy done), without waiting."""
    host = torch.empty((), dtype=flag.dtype, pin_memory=True)  # torch caches small pinned blocks
    host.copy_(flag, non_blocking=True)  # on flag's device's current stream
    copied = torch.cuda.Event()
    copied.record(torch.cuda.current_stream(flag.device))
    return host, copied


# Devices whose flag is copied to the host without waiting: device type -> copy function
_ASYNC_HOST_COPY = {"cuda": _copy_to_host_async}


class DoraLinearFunction(torch.autograd.Function):
    """y = g * (x W^T + s x A^T B^T) + b  (no dropout). See the module docstring."""

    @staticmethod
    @_autocast_off_in
    def forward(ctx, x, weight, bias, lora_A, lora_B, g, scaling: float):
        dtype = x.dtype
        x2 = _flat(x)
        h = x2 @ weight.to(dtype).t()
        xa = None
        if lora_A is not None:
            a, b = lora_A.to(dtype), lora_B.to(dtype)
            xa = x2 @ a.t()
            h = h.addmm_(xa, b.t(), alpha=scaling)
        # y = g * h (+ b); grad_g = sum_T(dy * h) reads h, or y / g (the module docstring)
        need_g = ctx.needs_input_grad[5]
        ctx.small_g = None  # set when backward divides y by g, unless some |g| is too small
        if bias is None and not (need_g and torch.compiler.is_compiling()):
            y = saved = scale_columns_(h, g)  # in place
            if need_g:
                ctx.small_g = SmallMagnitudeFlag(g, dtype)
        else:  # y - b would round h away; a traced graph cannot branch on g: keep h
            y = scale_columns_(h, g, bias, out=torch.empty_like(h))
            saved = h
        ctx.scaling = scaling
        ctx.x_shape = x.shape
        ctx.save_for_backward(x2, weight, lora_A, lora_B, g, xa, saved)
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    @_autocast_off_in
    def backward(ctx, dy):
        x2, weight, lora_A, lora_B, g, xa, saved = ctx.saved_tensors
        s = ctx.scaling
        dtype = x2.dtype
        dy2 = _flat(dy).to(dtype)
        need_x, _, need_bias, need_A, need_B, need_g, _ = ctx.needs_input_grad
        has_lora = lora_A is not None

        divide_by_g = ctx.small_g is not None
        if divide_by_g and ctx.small_g.read():  # y / g would lose h: recompute h instead
            saved = x2 @ weight.to(dtype).t()
            if has_lora:
                saved = saved.addmm_(xa, lora_B.to(dtype).t(), alpha=s)
            divide_by_g = False
        # dyg = dy * g and grad_g = sum_T(dy * h) in one pass over [T, out]
        dyg, _, grad_g = compose_backward(dy2, saved, g, divide_by_g=divide_by_g)
        grad_g = grad_g.to(g.dtype) if need_g else None
        # grad_x = dyg W + s (dyg B) A ;  grad_B = s dyg^T (x A^T) ;  grad_A = s (dyg B)^T x
        grad_x = grad_A = grad_B = None
        dyg_b = dyg @ lora_B.to(dtype) if has_lora and (need_x or need_A) else None  # [T, r]
        if need_x:
            grad_x = dyg @ weight.to(dtype)
            if has_lora:
                grad_x = grad_x.addmm_(dyg_b, lora_A.to(dtype), alpha=s)
            grad_x = grad_x.view(ctx.x_shape)
        if has_lora and need_B:
            grad_B = (dyg.t() @ xa).mul_(s).to(lora_B.dtype)
        if has_lora and need_A:
            grad_A = (dyg_b.t() @ x2).mul_(s).to(lora_A.dtype)
        grad_bias = dy2.sum(dim=0).to(dtype) if need_bias else None
        return grad_x, None, grad_bias, grad_A, grad_B, grad_g, None


class DoraDropoutLinearFunction(torch.autograd.Function):
    """y = x W^T + g1 * (x_d W^T) + g * s x_d A^T B^T + b  (paper-exact dropout).

    g is folded into the small B wherever it scales the rank-r branch (g * q = (x_d A^T)(g s B)^T),
    so neither q = s B A x_d nor dy * g is ever a [T, out] tensor; only p = W x_d is saved, and
    q's share of grad_g comes from the [out, r] product dy^T (x_d A^T) that grad_B needs anyway:
    sum_T(dy * q) = s rowsum(B * (dy^T x_d A^T)).
    """

    @staticmethod
    @_autocast_off_in
    def forward(ctx, x, x_drop, weight, bias, lora_A, lora_B, g, g_minus_1, scaling: float):
        dtype = x.dtype
        x2, xd2 = _flat(x), _flat(x_drop)
        w = weight.to(dtype)
        p = xd2 @ w.t()  # W x_d
        # y = x W^T + g1 * p + b in one pass (p itself is kept for grad_g)
        y = compose_dropout_forward(x2 @ w.t(), p, g_minus_1, bias)
        del w
        xa = None
        if lora_A is not None:
            xa = xd2 @ lora_A.to(dtype).t()
            scaled_b = lora_B * (scaling * g).unsqueeze(1)  # g * s B: [out, r]
            y = y.addmm_(xa, scaled_b.to(dtype).t())
        ctx.scaling = scaling
        ctx.has_lora = lora_A is not None
        ctx.x_shape = x.shape
        ctx.save_for_backward(xd2, weight, lora_A, lora_B, g, g_minus_1, xa, p)
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    @_autocast_off_in
    def backward(ctx, dy):
        xd2, weight, lora_A, lora_B, g, g_minus_1, xa, p = ctx.saved_tensors
        s = ctx.scaling
        dtype = xd2.dtype
        dy2 = _flat(dy).to(dtype)
        weight = weight.to(dtype)
        need_x, need_xd, _, need_bias, need_A, need_B, need_g, need_g1, _ = ctx.needs_input_grad

        # dyg1 = dy * g1 and sum_T(dy * p), one pass
        _, dyg1, grad_g = compose_backward(dy2, p, g, g_minus_1 if need_xd else None, need_dyg=False)
        grad_x = (dy2 @ weight).view(ctx.x_shape) if need_x else None
        grad_xd = dyg1 @ weight if need_xd else None
        grad_A = grad_B = None
        if ctx.has_lora:
            dy_xa = (dy2.t() @ xa).to(grad_g.dtype)  # [out, r]
            grad_g = grad_g + s * (lora_B.to(grad_g.dtype) * dy_xa).sum(dim=1)
            if need_B:
                grad_B = (dy_xa * (s * g).unsqueeze(1)).to(lora_B.dtype)
            if need_xd or need_A:
                dy_gb = dy2 @ (lora_B * g.unsqueeze(1)).to(dtype)  # (dy * g) B: [T, r]
                if need_xd:
                    grad_xd = grad_xd.addmm_(dy_gb, lora_A.to(dtype), alpha=s)
                if need_A:
                    grad_A = (dy_gb.t() @ xd2).mul_(s).to(lora_A.dtype)
        if grad_xd is not None:
            grad_xd = grad_xd.view(ctx.x_shape)
        grad_g = grad_g.to(g.dtype) if (need_g or need_g1) else None
        grad_bias = dy2.sum(dim=0).to(dtype) if need_bias else None
        # g and g1 = g - 1 share every upstream gradient: report the sum once, on g.
        if not need_g:
            return grad_x, grad_xd, None, grad_bias, grad_A, grad_B, None, grad_g, None
        return grad_x, grad_xd, None, grad_bias, grad_A, grad_B, grad_g, None, None
