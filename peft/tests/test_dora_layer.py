"""DoraLinear against a float64 dense reference of the paper's equations (forward and backward)."""
import math

import pytest
import torch
from torch import nn

from peft.tuners.dora import DoraLinear, factored_sq_norm, rowwise_sq_norm


class FixedMaskDropout(nn.Module):
    """Inverted dropout with a mask chosen by the test, so the reference sees the same mask."""

    def __init__(self, mask: torch.Tensor, p: float):
        super().__init__()
        self.mask, self.p = mask, p

    def forward(self, x):
        return x * self.mask.to(x.dtype) / (1 - self.p)


def reference_forward(x, W, b, A, B, m, s, simple, x_drop=None):
    """The formulas of the module docstring, dense, in whatever dtype the inputs have."""
    V = W if A is None else W + s * B @ A
    n = V.norm(dim=1)
    if simple:
        n = n.detach()
    g = m / n
    if x_drop is None:
        y = x @ (g[:, None] * V).T
    else:
        y = x @ W.T + (g - 1) * (x_drop @ W.T)
        if A is not None:
            y = y + g * s * (x_drop @ A.T @ B.T)
    return y if b is None else y + b


def make_layer(out_f, in_f, r, bias, simple, dtype, seed, p=0.0):
    torch.manual_seed(seed)
    base = nn.Linear(in_f, out_f, bias=bias)
    layer = DoraLinear(base, r=r, lora_alpha=2 * max(r, 1), lora_dropout=p, dora_simple=simple).to(dtype)
    with torch.no_grad():  # move away from the identity init so every term matters
        if r > 0:
            layer.lora_B.weight.normal_(0, 0.3)
        layer.weight_m_wdecomp.weight.mul_(1 + 0.2 * torch.randn_like(layer.weight_m_wdecomp.weight))
    return layer


CASES = [
    # (r, bias, simple, p, input shape prefix)
    (4, True, True, 0.0, (5,)),
    (4, False, False, 0.0, (2, 3)),
    (4, True, False, 0.3, (2, 3)),
    (8, False, True, 0.3, (7,)),
    (0, True, True, 0.0, (2, 3)),  # magnitude-only
    (0, False, True, 0.0, (5,)),
    (0, False, True, 0.3, (6,)),
    (0, True, False, 0.3, (2, 4)),
]


ZERO_ROWS = [0, 5, 11]


@pytest.mark.parametrize("zero_rows", [False, True], ids=["", "zero_m_rows"])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
@pytest.mark.parametrize("r,bias,simple,p,lead", CASES)
def test_layer_matches_float64_reference(r, bias, simple, p, lead, dtype, tol, zero_rows):
    """Forward and every gradient; ``zero_rows``: some rows with m = 0, so g = 0 there while
    m's gradient is sum_T(dy * h) / n (a path that recovers h from the output y = g * h cannot)."""
    out_f, in_f = 12, 10
    seed = torch.seed() % (2**31)  # fresh inputs each run; the seed is in the failure message
    layer = make_layer(out_f, in_f, r, bias, simple, dtype, seed, p).train()
    if zero_rows:
        with torch.no_grad():
            layer.weight_m_wdecomp.weight[ZERO_ROWS] = 0.0
    x = torch.randn(*lead, in_f, dtype=dtype, requires_grad=True)
    mask = None
    if p > 0:
        mask = (torch.rand(*lead, in_f) > p).to(dtype)
        layer.lora_dropout = FixedMaskDropout(mask, p)
    y = layer(x)
    grad_out = torch.randn_like(y)
    y.backward(grad_out)

    f64 = lambda t: None if t is None else t.detach().double().requires_grad_(True)
    W = layer.base_layer.weight.detach().double()
    b = None if layer.base_layer.bias is None else layer.base_layer.bias.detach().double()
    A = f64(layer.lora_A.weight) if r else None
    B = f64(layer.lora_B.weight) if r else None
    m = f64(layer.magnitude)
    xr = f64(x)
    x_drop = None if mask is None else xr * mask.double() / (1 - p)
    y_ref = reference_forward(xr, W, b, A, B, m, layer.scaling, simple, x_drop)
    y_ref.backward(grad_out.double())

    scale = y_ref.abs().max().item()
    msg = f"seed={seed}"
    assert y.dtype == dtype
    torch.testing.assert_close(y.double(), y_ref.detach(), atol=tol * scale, rtol=tol, msg=msg)
    pairs = [(x.grad, xr.grad), (layer.weight_m_wdecomp.weight.grad.view(-1), m.grad)]
    if r:
        pairs += [(layer.lora_A.weight.grad, A.grad), (layer.lora_B.weight.grad, B.grad)]
    for ours, ref in pairs:
        torch.testing.assert_close(ours.double(), ref, atol=tol * ref.abs().max().item(), rtol=tol, msg=msg)
    if zero_rows:
        assert m.grad[ZERO_ROWS].abs().min() > 1e-6 * m.grad.abs().max(), msg  # a gradient to get right


@pytest.mark.parametrize("r,p", [(4, 0.0), (4, 0.5), (0, 0.5)])
def test_eval_mode_is_one_matmul_formula(r, p):
    """In eval mode dropout is off whatever p is: y = g * (W x + s B A x) + b."""
    layer = make_layer(9, 7, r, True, True, torch.float64, seed=3, p=p).eval()
    x = torch.randn(4, 7, dtype=torch.float64)
    W, b = layer.base_layer.weight, layer.base_layer.bias
    A = layer.lora_A.weight if r else None
    B = layer.lora_B.weight if r else None
    with torch.no_grad():
        ref = reference_forward(x, W, b, A, B, layer.magnitude, layer.scaling, True)
        torch.testing.assert_close(layer(x), ref, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("out_f,in_f,r", [(16, 8, 4), (5, 3, 8), (64, 32, 16), (7, 1, 2)])
def test_factored_norm_equals_dense_norm(out_f, in_f, r):
    g = torch.Generator().manual_seed(out_f * 1000 + in_f * 10 + r)
    W = torch.randn(out_f, in_f, dtype=torch.float64, generator=g)
    A = torch.randn(r, in_f, dtype=torch.float64, generator=g)
    B = torch.randn(out_f, r, dtype=torch.float64, generator=g)
    s = 1.7
    dense = (W + s * B @ A).pow(2).sum(dim=1)
    factored = factored_sq_norm(rowwise_sq_norm(W), W, A, B, s)
    torch.testing.assert_close(factored, dense, atol=1e-10, rtol=1e-10)


def test_factored_norm_half_precision_weight_uses_fp32_blocks(monkeypatch):
    """A bf16 W is upcast block by block (several blocks here) and the result is fp32."""
    import peft.tuners.dora as dora

    monkeypatch.setattr(dora, "_FP32_CHUNK_ELEMENTS", 64)  # force many row blocks
    W = torch.randn(40, 16).to(torch.bfloat16)
    A, B = torch.randn(4, 16), torch.randn(40, 4)
    sq = factored_sq_norm(rowwise_sq_norm(W), W, A, B, 0.5)
    dense = (W.double() + 0.5 * B.double() @ A.double()).pow(2).sum(dim=1)
    assert sq.dtype == torch.float32
    torch.testing.assert_close(sq.double(), dense, rtol=1e-5, atol=1e-5)


def test_initial_layer_equals_base_layer():
    torch.manual_seed(0)
    base = nn.Linear(10, 6)
    layer = DoraLinear(base, r=4, lora_alpha=8, lora_dropout=0.0)
    x = torch.randn(3, 10)
    torch.testing.assert_close(layer(x), base(x), atol=1e-6, rtol=1e-6)
    assert layer.lora_A.weight.abs().max() <= 1 / math.sqrt(10) + 1e-6  # kaiming_uniform(a=sqrt(5)) bound


def test_dora_simple_detaches_norm_and_magnitude_trains():
    layer = make_layer(8, 6, 4, False, True, torch.float32, seed=1).train()
    assert not layer.direction_norm().requires_grad
    layer_full = make_layer(8, 6, 4, False, False, torch.float32, seed=1).train()
    assert layer_full.direction_norm().requires_grad

    # One optimizer step moves m (an implementation that loses m's gradient would not).
    opt = torch.optim.SGD([p for p in layer.parameters() if p.requires_grad], lr=0.1)
    before = layer.magnitude.detach().clone()
    layer(torch.randn(5, 6)).pow(2).sum().backward()
    opt.step()
    assert (layer.magnitude.detach() - before).abs().max() > 1e-4

    # A zero-initialised B still trains m from the very first step.
    fresh = DoraLinear(nn.Linear(6, 8), r=4, lora_alpha=8)
    fresh(torch.randn(5, 6)).pow(2).sum().backward()
    assert fresh.weight_m_wdecomp.weight.grad.abs().max() > 0


def test_simple_and_full_gradients_differ_only_through_the_norm():
    """dora_simple changes A/B gradients (norm term) but not the forward."""
    a = make_layer(8, 6, 4, False, True, torch.float64, seed=5).train()
    b = make_layer(8, 6, 4, False, False, torch.float64, seed=5).train()
    x = torch.randn(3, 6, dtype=torch.float64)
    ya, yb = a(x), b(x)
    torch.testing.assert_close(ya, yb)
    ya.sum().backward()
    yb.sum().backward()
    assert (a.lora_B.weight.grad - b.lora_B.weight.grad).abs().max() > 1e-8


def test_weight_norm_cache_follows_weight_changes():
    layer = make_layer(8, 6, 0, False, True, torch.float64, seed=2)
    first = layer.weight_sq_norm()
    assert layer.weight_sq_norm() is first  # cached: W is frozen
    with torch.no_grad():
        layer.base_layer.weight.mul_(2)
    torch.testing.assert_close(layer.weight_sq_norm(), 4 * first)


def test_adapter_params_stay_fp32_over_half_base_and_output_keeps_base_dtype():
    base = nn.Linear(8, 6).to(torch.bfloat16)
    layer = DoraLinear(base, r=4, lora_alpha=8, lora_dropout=0.1).train()
    assert layer.lora_A.weight.dtype == layer.weight_m_wdecomp.weight.dtype == torch.float32
    y = layer(torch.randn(3, 8, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer.lora_A.weight.grad.dtype == torch.float32


@pytest.mark.parametrize("r", [0, 4])
def test_an_all_zero_row_of_w_gives_no_nan(r):
    """n = sqrt(max(eps, ||V||^2)) for magnitude-only layers too (it gave 0 / 0 there)."""
    torch.manual_seed(0)
    base = nn.Linear(8, 6, bias=False)
    with torch.no_grad():
        base.weight[2] = 0.0
    layer = DoraLinear(base, r=r, lora_alpha=2 * max(r, 1)).train()
    x = torch.randn(5, 8, requires_grad=True)
    y = layer(x)
    y.sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    assert torch.isfinite(layer.weight_m_wdecomp.weight.grad).all()
    assert layer.direction_norm()[2].item() == pytest.approx(1e-6)
    assert torch.equal(y[:, 2], torch.zeros(5))
