r"""Triton kernels for DoRA's elementwise work around the matmuls (with torch fallbacks).

``dora_kernels.py`` does the matmuls with torch; what is left between them is a handful
of passes over [T, out] activations. Each pass here reads every input once and writes
every output once, in the activation dtype, with the arithmetic in fp32 registers:

    compose_dropout_forward  y = base + g1 * p + b                                  [T, out]
    compose_backward         dyg = dy * g ;  dyg1 = dy * g1 ;
                             grad_g = sum_T(dy * saved) (/ g)                        [T, out]
    scale_columns_           y = h * g + b                                           [T, out]

Every function has a torch path with the same semantics (the arithmetic of the original
``dora_kernels`` code, so float64 runs stay exact). ``use_triton(t)`` says which path a
tensor takes: Triton for CUDA tensors in fp32/fp16/bf16 when triton imports, and for CPU
tensors too when ``TRITON_INTERPRET=1`` was set before this module was imported (how the
tests check the kernels without a GPU). ``triton_disabled()`` forces the torch path.

A kernel that fails (a compile error, an unsupported dtype or architecture, no driver)
cannot take a run down: the failing call and every later one in the process take the torch
path, with one warning naming the kernel and the error (``kernel_path()`` says which path
runs, for benchmark records). The failure happens at launch, before the kernel writes
anything, so the torch path starts from intact inputs. The environment variable
``DORA_TRITON`` chooses: ``auto`` (the default, as above), ``0`` (torch only) or ``1``
(Triton where it applies, and a kernel failure is an error, for testing a GPU set-up).
Inside ``torch.compile`` a failure is always raised (a traced graph cannot switch paths).

The column reduction of ``compose_backward`` is two-stage (per-program partial sums, then
one program per column block adds them in a fixed order), so it is deterministic.
"""
from __future__ import annotations

import contextlib
import os
import warnings
from typing import Iterator, Optional, Tuple

import torch

try:  # triton is optional: without it every function takes its torch path
    import triton
    import triton.language as tl

    TRITON_AVAILABLE = True
except ImportError:  # pragma: no cover - depends on the environment
    triton = None
    tl = None
    TRITON_AVAILABLE = False

# Read once: triton itself reads the variable at import time, so a later change would not
# make CPU launches work anyway.
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_enabled = True


def _mode_from_environment() -> str:
    value = os.environ.get("DORA_TRITON", "auto").strip().lower() or "auto"
    if value not in ("auto", "0", "1"):
        raise ValueError(f"DORA_TRITON must be auto, 0 or 1, got {value!r}")
    return value


# "auto", "0" (torch only) or "1" (a kernel failure is an error); see the module docstring.
KERNEL_MODE = _mode_from_environment()
# Set by the first kernel failure in "auto" mode: "<kernel>: <error>"; from then on, torch.
_failure: Optional[str] = None

# Elementwise [T, out] tiles: 4096 elements per program, columns contiguous.
_TILE_T = 32
_TILE_N = 128
# compose_backward's grid aims at about this many programs (several per SM on any current
# GPU). It depends on the shape only, so the summation order, and hence the result, does
# not depend on the device.
_REDUCTION_PROGRAMS = 1024


def use_triton(t: torch.Tensor) -> bool:
    """True when the functions here run their Triton kernel for tensors like ``t``."""
    if not (_enabled and TRITON_AVAILABLE) or KERNEL_MODE == "0" or _failure is not None:
        return False
    if t.dtype not in _KERNEL_DTYPES:
        return False
    return t.is_cuda or (TRITON_INTERPRET and t.device.type == "cpu")


def kernel_path(device: str = "cuda") -> str:
    """Which path the elementwise passes take for ``device`` tensors in this process, for logs
    and benchmark records: ``triton``, or ``torch (<why>)``, e.g. ``torch (Triton failed: ...)``."""
    if _failure is not None:
        return f"torch (Triton failed: {_failure})"
    if not TRITON_AVAILABLE:
        return "torch (triton is not installed)"
    if KERNEL_MODE == "0":
        return "torch (DORA_TRITON=0)"
    if not _enabled:
        return "torch (triton_disabled)"
    if torch.device(device).type == "cpu" and not TRITON_INTERPRET:
        return "torch (CPU tensors; Triton runs on CUDA, or on the CPU under TRITON_INTERPRET=1)"
    return "triton"


_FAILED = object()


def _run_kernel(name: str, launch, *args):
    """``launch(*args)``, or ``_FAILED`` after a failure that switched to torch (``_kernel_failed``)."""
    try:
        return launch(*args)
    except Exception as exc:  # noqa: BLE001 - any launch failure falls back (see the module docstring)
        _kernel_failed(name, exc)
        return _FAILED


def _kernel_failed(name: str, exc: Exception) -> None:
    """Switch this process to the torch path after a kernel failure (or re-raise where asked)."""
    global _failure
    if KERNEL_MODE == "1" or torch.compiler.is_compiling():
        raise exc
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    _failure = f"{name}: {type(exc).__name__}: {message}"[:300]
    warnings.warn(
        f"DoRA's Triton kernel {_failure}; this process uses the torch path from now on "
        "(results are unchanged; DORA_TRITON=0 skips Triton, DORA_TRITON=1 makes this an error)",
        RuntimeWarning,
        stacklevel=3,
    )


@contextlib.contextmanager
def triton_disabled() -> Iterator[None]:
    """Within the block every function takes its torch path (for comparisons and debugging)."""
    global _enabled
    previous, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = previous


def _rows_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.is_contiguous() else t.contiguous()


def _vector_fp32(t: torch.Tensor) -> torch.Tensor:
    """A per-column vector as the kernels read it: fp32, contiguous."""
    return t.detach().to(torch.float32).contiguous()


def _launch_device(t: torch.Tensor):
    # Eager Triton launches go to the current CUDA device: make that the tensors' device
    # (for models split over GPUs). Compiled graphs place their launches themselves.
    if t.is_cuda and not torch.compiler.is_compiling():
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def _elementwise_grid(rows: int, cols: int) -> Tuple[int, int]:
    return (triton.cdiv(rows, _TILE_T), triton.cdiv(cols, _TILE_N))


# ---- kernels ------------------------------------------------------------------------------
if TRITON_AVAILABLE:

    @triton.jit
    def _compose_dropout_forward_kernel(
        base_ptr, p_ptr, g1_ptr, bias_ptr, y_ptr,
        num_rows, num_cols,
        HAS_BIAS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < num_cols
        mask = (rows < num_rows)[:, None] & col_ok[None, :]
        offsets = rows.to(tl.int64)[:, None] * num_cols + cols[None, :]
        p = tl.load(p_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        g1 = tl.load(g1_ptr + cols, mask=col_ok, other=0.0)
        y = tl.load(base_ptr + offsets, mask=mask, other=0.0).to(tl.float32) + g1[None, :] * p
        if HAS_BIAS:
            y += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + offsets, y.to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _compose_backward_kernel(
        dy_ptr, saved_ptr, g_ptr, g1_ptr, dyg_ptr, dyg1_ptr, partial_ptr,
        num_rows, num_cols, rows_per_program,
        WRITE_DYG: tl.constexpr, HAS_G1: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        pid_t = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < num_cols
        g = tl.load(g_ptr + cols, mask=col_ok, other=0.0)
        if HAS_G1:
            g1 = tl.load(g1_ptr + cols, mask=col_ok, other=0.0)
        column_sum = tl.zeros([BLOCK_N], dtype=tl.float32)
        first_row = pid_t * rows_per_program
        for t0 in range(0, rows_per_program, BLOCK_T):
            rows = first_row + t0 + tl.arange(0, BLOCK_T)
            mask = (rows < num_rows)[:, None] & col_ok[None, :]
            offsets = rows.to(tl.int64)[:, None] * num_cols + cols[None, :]
            dy = tl.load(dy_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
            saved = tl.load(saved_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
            column_sum += tl.sum(dy * saved, axis=0)
            if WRITE_DYG:
                tl.store(dyg_ptr + offsets, (dy * g[None, :]).to(dyg_ptr.dtype.element_ty), mask=mask)
            if HAS_G1:
                tl.store(dyg1_ptr + offsets, (dy * g1[None, :]).to(dyg1_ptr.dtype.element_ty), mask=mask)
        tl.store(partial_ptr + pid_t.to(tl.int64) * num_cols + cols, column_sum, mask=col_ok)

    @triton.jit
    def _sum_partials_kernel(
        partial_ptr, g_ptr, out_ptr, num_partials, num_cols,
        DIVIDE_BY_G: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < num_cols
        total = tl.zeros([BLOCK_N], dtype=tl.float32)
        for i in range(0, num_partials):  # a fixed order: the result is deterministic
            total += tl.load(partial_ptr + i * num_cols + cols, mask=col_ok, other=0.0)
        if DIVIDE_BY_G:
            total = tl.div_rn(total, tl.load(g_ptr + cols, mask=col_ok, other=1.0))
        tl.store(out_ptr + cols, total, mask=col_ok)

    @triton.jit
    def _scale_columns_kernel(
        h_ptr, g_ptr, bias_ptr, y_ptr, num_rows, num_cols,
        HAS_BIAS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < num_cols
        mask = (rows < num_rows)[:, None] & col_ok[None, :]
        offsets = rows.to(tl.int64)[:, None] * num_cols + cols[None, :]
        g = tl.load(g_ptr + cols, mask=col_ok, other=0.0)
        y = tl.load(h_ptr + offsets, mask=mask, other=0.0).to(tl.float32) * g[None, :]
        if HAS_BIAS:
            y += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + offsets, y.to(y_ptr.dtype.element_ty), mask=mask)


# ---- compose_dropout_forward --------------------------------------------------------------
def compose_dropout_forward(
    base_x: torch.Tensor, p: torch.Tensor, g1: torch.Tensor, bias: Optional[torch.Tensor]
) -> torch.Tensor:
    """y = base_x + g1 * p + bias, written into base_x's buffer (p is left intact).

    base_x and p are [T, out] in the activation dtype; g1 is [out].
    """
    if use_triton(base_x) and base_x.numel() > 0:
        result = _run_kernel("compose_dropout_forward", _compose_dropout_forward_triton, base_x, p, g1, bias)
        if result is not _FAILED:
            return result
    y = torch.addcmul(base_x, p, g1, out=base_x)  # g1 unrounded (see scale_columns_)
    return y.add_(bias) if bias is not None else y


def _compose_dropout_forward_triton(base_x, p, g1, bias) -> torch.Tensor:
    base_x, p = _rows_contiguous(base_x), _rows_contiguous(p)
    num_rows, num_cols = base_x.shape
    g1_32 = _vector_fp32(g1)
    bias_arg = bias.detach().contiguous() if bias is not None else g1_32  # unread without bias
    with _launch_device(base_x):
        _compose_dropout_forward_kernel[_elementwise_grid(num_rows, num_cols)](
            base_x, p, g1_32, bias_arg, base_x, num_rows, num_cols,
            HAS_BIAS=bias is not None, BLOCK_T=_TILE_T, BLOCK_N=_TILE_N,
        )
    return base_x


# ---- compose_backward ---------------------------------------------------------------------
def _reduction_programs(num_rows: int, num_col_blocks: int) -> Tuple[int, int]:
    """(programs along T, rows each): enough programs to fill the GPU, few partial rows."""
    row_tiles = triton.cdiv(num_rows, _TILE_T)
    programs = max(1, min(row_tiles, _REDUCTION_PROGRAMS // num_col_blocks))
    rows_each = triton.cdiv(row_tiles, programs) * _TILE_T
    return triton.cdiv(num_rows, rows_each), rows_each


def compose_backward(
    dy: torch.Tensor,
    saved: torch.Tensor,
    g: torch.Tensor,
    g1: Optional[torch.Tensor] = None,
    divide_by_g: bool = False,
    need_dyg: bool = True,
) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], torch.Tensor]:
    """(dyg, dyg1, grad_g): dy * g, dy * g1 (None without g1), and sum_T(dy * saved).

    grad_g is accumulated in (at least) fp32 and divided by g when ``divide_by_g`` (the
    saved tensor is then y = g * h; the caller divides only where no |g| is too small for
    that to give h back, and passes h itself otherwise: ``dora_kernels``'s module docstring).
    ``need_dyg=False`` skips dyg.
    """
    if use_triton(dy) and dy.numel() > 0:
        result = _run_kernel("compose_backward", _compose_backward_triton, dy, saved, g, g1, divide_by_g, need_dyg)
        if result is not _FAILED:
            return result
    dtype = dy.dtype
    grad_g = (dy * saved).sum(dim=0, dtype=torch.promote_types(dtype, torch.float32))
    if divide_by_g:
        grad_g = grad_g / g
    # dy * g and dy * g1 as scale_columns_ computes h * g: one rounding, to dy's dtype
    dyg = torch.mul(dy, g, out=torch.empty_like(dy)) if need_dyg else None
    dyg1 = torch.mul(dy, g1, out=torch.empty_like(dy)) if g1 is not None else None
    return dyg, dyg1, grad_g


def _compose_backward_triton(dy, saved, g, g1, divide_by_g, need_dyg):
    dy, saved = _rows_contiguous(dy), _rows_contiguous(saved)
    num_rows, num_cols = dy.shape
    g_32 = _vector_fp32(g)
    g1_32 = _vector_fp32(g1) if g1 is not None else g_32  # unread without g1
    dyg = torch.empty_like(dy) if need_dyg else None
    dyg1 = torch.empty_like(dy) if g1 is not None else None
    col_blocks = triton.cdiv(num_cols, _TILE_N)
    row_programs, rows_each = _reduction_programs(num_rows, col_blocks)
    partial = torch.empty(row_programs, num_cols, dtype=torch.float32, device=dy.device)
    grad_g = torch.empty(num_cols, dtype=torch.float32, device=dy.device)
    with _launch_device(dy):
        _compose_backward_kernel[(row_programs, col_blocks)](
            dy, saved, g_32, g1_32, dyg if dyg is not None else dy, dyg1 if dyg1 is not None else dy, partial,
            num_rows, num_cols, rows_each,
            WRITE_DYG=need_dyg, HAS_G1=g1 is not None, BLOCK_T=_TILE_T, BLOCK_N=_TILE_N,
        )
        _sum_partials_kernel[(col_blocks,)](
            partial, g_32, grad_g, row_programs, num_cols, DIVIDE_BY_G=divide_by_g, BLOCK_N=_TILE_N,
        )
    return dyg, dyg1, grad_g


# ---- scale_columns_ -----------------------------------------------------------------------
def scale_columns_(
    h: torch.Tensor, g: torch.Tensor, bias: Optional[torch.Tensor] = None, out: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """y = h * g + bias, written into h (or into ``out`` when given, leaving h intact)."""
    if use_triton(h) and h.numel() > 0:
        result = _run_kernel("scale_columns_", _scale_columns_triton, h, g, bias, out)
        if result is not _FAILED:
            return result
    # Mixed dtypes on purpose: torch then computes in the wider one (fp32 for a half-precision
    # h) and rounds once to h's dtype, as the kernel does. g is never rounded: 1 + 2^-9 does not
    # exist in bf16, so a rounded g would erase small magnitude updates, and y / g recovers h
    # (dora_kernels' no-bias backward) only from a once-rounded g * h. (On the CPU, torch
    # upcasts a half-precision h to a temporary for this; on CUDA it casts in registers.)
    y = h if out is None else out
    if bias is None:
        return torch.mul(h, g, out=y)
    return torch.addcmul(bias.expand_as(h), h, g, out=y)


def _scale_columns_triton(h, g, bias, out) -> torch.Tensor:
    if not h.is_contiguous():
        if out is None:  # in place on a strided tensor: compute contiguously, copy back
            return h.copy_(scale_columns_(h.contiguous(), g, bias))
        h = h.contiguous()
    y = h if out is None else out
    if not y.is_contiguous():
        return y.copy_(scale_columns_(h, g, bias, out=torch.empty_like(h)))
    num_rows, num_cols = h.shape
    g_32 = _vector_fp32(g)
    bias_arg = bias.detach().contiguous() if bias is not None else g_32  # unread without bias
    with _launch_device(h):
        _scale_columns_kernel[_elementwise_grid(num_rows, num_cols)](
            h, g_32, bias_arg, y, num_rows, num_cols,
            HAS_BIAS=bias is not None, BLOCK_T=_TILE_T, BLOCK_N=_TILE_N,
        )
    return y
