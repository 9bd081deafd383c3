"""QDoRA / QLoRA check on a device: 8-bit and 4-bit (NF4) bases against a dequantized reference.

For each quantization kind: a DoRA layer over the quantized layer (half-precision compute on
CUDA, fp32 on CPU) vs the float64 formula with W = the dequantized weight, forward and the
gradients of A, B, m; then a tiny LLaMA loaded quantized through the project's loader trains
a few steps with DoRA and must lower its loss. Prints one line per check; exit status = number
of failed checks. The CPU variant of the same numerics is peft/tests/test_dora_quantized.py.

    python benchmarks/quantized_check.py --device cuda
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "peft" / "src"), str(ROOT / "tests")]


def reference(x, W, b, A, B, m, s):
    """The DoRA output in float64 (dora_simple: the norm is a constant)."""
    V = W + s * B @ A
    g = m / V.norm(dim=1).detach()
    y = g * (x @ W.T + s * (x @ A.T) @ B.T)
    return y + b if b is not None else y


def layer_check(kind: str, device: str, dtype: torch.dtype) -> tuple[bool, str]:
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnb_functional

    from peft.tuners.dora import DoraLinear
    from peft.tuners.quantized import int8_row_scales

    torch.manual_seed(0)
    in_f, out_f, r = 1024, 768, 16
    dense = nn.Linear(in_f, out_f, bias=True)
    if kind == "4bit":
        base = bnb.nn.Linear4bit(in_f, out_f, bias=True, compute_dtype=dtype, quant_type="nf4")
    else:
        base = bnb.nn.Linear8bitLt(in_f, out_f, bias=True, has_fp16_weights=False)
    base.load_state_dict(dense.state_dict())
    base = base.to(device)
    if base.bias is not None:
        base.bias.data = base.bias.data.to(dtype)
    layer = DoraLinear(base, r=r, lora_alpha=2 * r).to(device)
    with torch.no_grad():
        layer.lora_B.weight.normal_(0, 0.05)
        layer.weight_m_wdecomp.weight.mul_(1 + 0.1 * torch.randn_like(layer.weight_m_wdecomp.weight))
    layer.invalidate_norm_cache()
    x = torch.randn(4, 64, in_f, device=device, dtype=dtype)
    y = layer(x)
    grad = torch.randn_like(y)
    y.backward(grad)

    if kind == "4bit":
        W = bnb_functional.dequantize_4bit(base.weight.data, base.weight.quant_state).double()
    else:
        W = base.weight.data.double() * int8_row_scales(base).double()[:, None] / 127
    leaf = lambda t: t.detach().double().requires_grad_(True)
    A, B, m = leaf(layer.lora_A.weight), leaf(layer.lora_B.weight), leaf(layer.magnitude)
    b = base.bias.detach().double() if base.bias is not None else None
    y_ref = reference(x.double(), W, b, A, B, m, layer.scaling)
    y_ref.backward(grad.double())

    def rel(ours, ref):
        return ((ours.double() - ref).norm() / ref.norm()).item()

    errors = {
        "y": rel(y, y_ref.detach()),
        "grad_A": rel(layer.lora_A.weight.grad, A.grad),
        "grad_B": rel(layer.lora_B.weight.grad, B.grad),
        "grad_m": rel(layer.weight_m_wdecomp.weight.grad.view(-1), m.grad),
    }
    # Half-precision compute, and LLM.int8 also rounds the activations to int8.
    limit = 1e-4 if dtype == torch.float32 and kind == "4bit" else (2e-2 if kind == "4bit" else 5e-2)
    ok = all(v < limit for v in errors.values())
    detail = ", ".join(f"{k} rel err {v:.1e}" for k, v in errors.items())
    return ok, f"{kind} DoRA layer vs float64 dequantized reference ({dtype}, limit {limit:.0e}): {detail}"


def training_check(kind: str, device: str) -> tuple[bool, str]:
    from commonsense.models import load_base_model
    from peft import DoraConfig, get_peft_model, prepare_model_for_kbit_training
    from tiny_models import build_tiny_llama

    folder = build_tiny_llama(Path(tempfile.mkdtemp()), hidden_size=128)
    model = load_base_model(str(folder), device=device, **{f"load_{kind}": True})
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    model = get_peft_model(model, DoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    torch.manual_seed(0)
    ids = torch.randint(3, 200, (8, 32), device=device)
    model.train()
    losses = []
    for _ in range(20):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    ok = all(v == v for v in losses) and losses[-1] < losses[0] - 0.1
    return ok, f"{kind} tiny LLaMA, 20 DoRA steps: loss {losses[0]:.3f} -> {losses[-1]:.3f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    dtype = torch.float32 if args.device == "cpu" else (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
    failures = 0
    for kind in ("4bit", "8bit"):
        for check in (lambda: layer_check(kind, args.device, dtype), lambda: training_check(kind, args.device)):
            try:
                ok, line = check()
            except Exception as err:  # report and go on: one run shows every check
                ok, line = False, f"{kind}: {type(err).__name__}: {err}"
            failures += not ok
            print(("PASS " if ok else "FAIL ") + line, flush=True)
    return failures


if __name__ == "__main__":
    raise SystemExit(main())
