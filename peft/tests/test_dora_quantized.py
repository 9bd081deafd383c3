"""DoRA and LoRA over bitsandbytes 8-bit / 4-bit (NF4) base layers, on the CPU.

The reference is the float64 formula with W = the dequantized weight, i.e. the weight the
quantized matmul applies. 4-bit layers compute in fp32 here, so the whole layer matches the
reference tightly. LLM.int8 on CUDA also rounds the activations to int8, so its W x is only
approximately x W_deq^T there: for 8-bit the output is checked through the layer's own W x
(and only loosely against x W_deq^T). benchmarks/quantized_check.py runs these on a GPU.
"""
import pytest
import torch
from torch import nn

from peft.tuners import dora
from peft.tuners.dora import DoraLinear
from peft.tuners.lora import LoraLinear
from peft.tuners.quantized import int8_row_scales

from test_dora_layer import FixedMaskDropout, reference_forward

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")
import bitsandbytes.functional as bnb_functional  # noqa: E402


def quantized_linear(kind, in_f, out_f, bias, seed):
    torch.manual_seed(seed)
    dense = nn.Linear(in_f, out_f, bias=bias)
    if kind == "4bit":
        layer = bnb.nn.Linear4bit(in_f, out_f, bias=bias, compute_dtype=torch.float32, quant_type="nf4")
    else:
        layer = bnb.nn.Linear8bitLt(in_f, out_f, bias=bias, has_fp16_weights=False)
    layer.load_state_dict(dense.state_dict())
    return layer.to("cpu")  # quantizes


def dequantized(layer) -> torch.Tensor:
    if isinstance(layer, bnb.nn.Linear4bit):
        return bnb_functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).double()
    return layer.weight.data.double() * int8_row_scales(layer).double()[:, None] / 127


def randomize(layer):
    with torch.no_grad():
        if getattr(layer, "r", 0) > 0:
            layer.lora_B.weight.normal_(0, 0.3)
        if isinstance(layer, DoraLinear):
            layer.weight_m_wdecomp.weight.mul_(1 + 0.2 * torch.randn_like(layer.weight_m_wdecomp.weight))


@pytest.mark.parametrize("kind", ["4bit", "8bit"])
@pytest.mark.parametrize("r", [4, 0])
def test_norm_uses_dequantized_rows_blockwise(kind, r, monkeypatch):
    seed = torch.seed() % (2**31)
    layer = DoraLinear(quantized_linear(kind, 64, 48, True, seed), r=r, lora_alpha=8)
    randomize(layer)
    monkeypatch.setattr(dora, "_FP32_CHUNK_ELEMENTS", 64 * 5)  # several row blocks (and a ragged last one)
    layer.invalidate_norm_cache()
    W = dequantized(layer.base_layer)
    V = W if r == 0 else W + layer.scaling * layer.lora_B.weight.double() @ layer.lora_A.weight.double()
    torch.testing.assert_close(layer.weight_sq_norm().double(), W.pow(2).sum(1), rtol=1e-5, atol=0, msg=f"seed={seed}")
    torch.testing.assert_close(layer.direction_norm().double(), V.norm(dim=1), rtol=1e-5, atol=0, msg=f"seed={seed}")
    # Nothing of W's size is kept: the caches are per-row vectors, the packed weight is untouched.
    for cached in (layer._weight_sq_norm_cache, layer._norm_cache):
        if cached is not None:
            assert cached[1].shape == (48,)
    assert layer.base_layer.weight.dtype in (torch.uint8, torch.int8)


def test_initial_magnitude_makes_the_adapter_an_identity():
    layer = DoraLinear(quantized_linear("4bit", 64, 32, True, 3), r=4, lora_alpha=8)
    x = torch.randn(5, 64)
    torch.testing.assert_close(layer(x), layer.base_layer(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bias,simple,p", [(True, True, 0.0), (False, False, 0.0), (True, True, 0.4), (False, False, 0.4)])
@pytest.mark.parametrize("r", [4, 0])
def test_4bit_dora_layer_matches_float64_reference(r, bias, simple, p):
    seed = torch.seed() % (2**31)
    layer = DoraLinear(quantized_linear("4bit", 64, 48, bias, seed), r=r, lora_alpha=8, lora_dropout=p, dora_simple=simple)
    randomize(layer)
    layer.train()
    x = torch.randn(2, 5, 64, requires_grad=True)
    mask = None
    if p > 0:
        mask = (torch.rand(2, 5, 64) > p).float()
        layer.lora_dropout = FixedMaskDropout(mask, p)
    y = layer(x)
    grad_out = torch.randn_like(y)
    y.backward(grad_out)

    f64 = lambda t: t.detach().double().requires_grad_(True)
    W = dequantized(layer.base_layer)
    b = None if layer.base_layer.bias is None else layer.base_layer.bias.detach().double()
    A = f64(layer.lora_A.weight) if r else None
    B = f64(layer.lora_B.weight) if r else None
    m, xr = f64(layer.magnitude), f64(x)
    x_drop = None if mask is None else xr * mask.double() / (1 - p)
    y_ref = reference_forward(xr, W, b, A, B, m, layer.scaling, simple, x_drop)
    y_ref.backward(grad_out.double())

    msg, tol = f"seed={seed}", 2e-5
    torch.testing.assert_close(y.double(), y_ref.detach(), atol=tol * y_ref.abs().max().item(), rtol=tol, msg=msg)
    pairs = [(x.grad, xr.grad), (layer.weight_m_wdecomp.weight.grad.view(-1), m.grad)]
    if r:
        pairs += [(layer.lora_A.weight.grad, A.grad), (layer.lora_B.weight.grad, B.grad)]
    for ours, ref in pairs:
        torch.testing.assert_close(ours.double(), ref, atol=tol * ref.abs().max().item(), rtol=tol, msg=msg)


@pytest.mark.parametrize("bias", [True, False])
def test_8bit_dora_output_is_the_formula_over_the_layers_own_product(bias):
    """y = g * (h + s B A x) + b with h = base_layer(x) - b, g from the dequantized norm."""
    seed = torch.seed() % (2**31)
    layer = DoraLinear(quantized_linear("8bit", 64, 48, bias, seed), r=4, lora_alpha=8).eval()
    randomize(layer)
    x = torch.randn(6, 64)
    with torch.no_grad():
        y = layer(x).double()
        base = layer.base_layer(x).double()
    b = layer.base_layer.bias.detach().double() if bias else torch.zeros(48, dtype=torch.float64)
    A, B = layer.lora_A.weight.double(), layer.lora_B.weight.double()
    W = dequantized(layer.base_layer)
    g = layer.magnitude.double() / (W + layer.scaling * B @ A).norm(dim=1)
    expected = g * (base - b + layer.scaling * x.double() @ A.T @ B.T) + b
    torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item(), msg=f"seed={seed}")
    # and, more loosely, the dequantized-weight formula itself (LLM.int8 rounds the activations)
    y_ref = reference_forward(x.double(), W, b if bias else None, A, B, layer.magnitude.double(), layer.scaling, True)
    assert (y - y_ref).abs().max() < 0.05 * y_ref.abs().max()


@pytest.mark.parametrize("kind", ["4bit", "8bit"])
def test_lora_over_quantized_base(kind):
    layer = LoraLinear(quantized_linear(kind, 64, 32, True, 5), r=4, lora_alpha=8)
    randomize(layer)
    x = torch.randn(3, 64)
    delta = layer.scaling * x @ layer.lora_A.weight.T @ layer.lora_B.weight.T
    torch.testing.assert_close(layer(x), layer.base_layer(x) + delta, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cls", [DoraLinear, LoraLinear])
def test_merge_into_quantized_weights_is_refused(cls):
    layer = cls(quantized_linear("4bit", 64, 32, False, 0), r=4, lora_alpha=8)
    with pytest.raises(RuntimeError, match="cannot merge an adapter into 4bit base weights"):
        layer.merge()
    assert not layer.merged


def test_small_magnitude_update_survives_a_half_precision_compute_dtype():
    """A 4-bit base computing in bf16: g = 1.003 (not a bf16 number) must still scale the output."""
    torch.manual_seed(4)
    dense = nn.Linear(64, 48, bias=False)
    base = bnb.nn.Linear4bit(64, 48, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
    base.load_state_dict(dense.state_dict())
    layer = DoraLinear(base.to("cpu"), r=0, lora_alpha=1)
    with torch.no_grad():
        layer.weight_m_wdecomp.weight.copy_(layer.direction_norm().unsqueeze(1) * 1.003)
    x = torch.randn(2048, 64, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    with torch.no_grad():
        ratio = (layer(x).double().abs().sum() / layer.base_layer(x).double().abs().sum()).item()
    assert abs(ratio - 1.003) < 3e-4, ratio
