"""The precision matrix: base dtype x autocast x dropout x mode x method x merged, against fp32.

Every combination runs a tiny LLaMA forward (and backward where autograd is on) and is
compared with the same model, same adapter weights and same dropout masks in fp32 without
autocast: the loss, each adapter gradient (cosine) and the logits agree within the compute
dtype's tolerance; adapter weights and their gradients stay fp32; every adapter layer's
output has the dtype the plain ``nn.Linear`` it wraps gives under the same conditions.
The tolerances are per compute dtype and shared by LoRA and DoRA, so DoRA is held to what
autocast gives LoRA. On a machine with a GPU the same matrix also runs on CUDA (fp16 and
bf16 autocast); ``benchmarks/gpu_check.sh`` runs this file there.
"""
import copy
import itertools

import pytest
import torch
from torch import nn

from peft import DoraConfig, LoraConfig, get_peft_model
from peft.tuners.dora_kernels import PrecisionError
from peft.tuners.tuners_utils import AdapterLayer

from tiny_llama import make_tiny_llama

TARGETS = ["q_proj", "v_proj", "up_proj"]
# What the compute dtype may cost against fp32: (loss, relative; logits, relative to the
# largest; gradient cosine, at least).
TOLERANCE = {
    torch.float32: (1e-5, 1e-5, 0.99999),
    torch.float16: (5e-3, 1e-2, 0.999),
    torch.bfloat16: (3e-2, 6e-2, 0.99),
}


class SeededDropout(nn.Module):
    """Inverted dropout whose mask depends only on the input's shape (so every dtype sees the same)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training:
            return x
        gen = torch.Generator().manual_seed(hash(tuple(x.shape)) % (2**31))
        keep = (torch.rand(x.shape, generator=gen) > self.p).to(device=x.device, dtype=x.dtype)
        return x * keep / (1 - self.p)


def adapted_model(method: str, dropout: float) -> nn.Module:
    model = make_tiny_llama(seed=1)
    if method == "lora":
        config = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=TARGETS)
    elif method == "dora":
        config = DoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=TARGETS)
    else:  # magnitude-only
        config = DoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=[], Wdecompose_target_modules=TARGETS)
    model = get_peft_model(model, config)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():  # away from the identity init, so every term of the formula matters
        for name, param in model.named_parameters():
            if param.requires_grad:
                if "lora_B" in name:
                    param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
                if "weight_m_wdecomp" in name:
                    param.mul_(1 + 0.1 * torch.randn(param.shape, generator=gen))
    for layer in model.modules():
        if isinstance(layer, AdapterLayer) and dropout > 0:
            layer.lora_dropout = SeededDropout(dropout)
    return model


def cast_base(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """The frozen base in ``dtype``; the adapter stays fp32 (as the fine-tuning recipe keeps it)."""
    for name, param in model.named_parameters():
        if not param.requires_grad:
            param.data = param.data.to(dtype)
    for layer in model.modules():
        if hasattr(layer, "invalidate_norm_cache"):
            layer.invalidate_norm_cache()
    return model


def record_output_dtypes(model: nn.Module, autocast):
    """Hooks that check each adapter layer's output dtype against its plain nn.Linear's."""
    seen = []

    def hook(layer, inputs, output):
        with torch.no_grad():
            seen.append((output.dtype, layer.base_layer(inputs[0]).dtype))

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, AdapterLayer)]
    return seen, handles


def run(model, ids, mode: str, merged: bool, autocast, device: str = "cpu"):
    """(loss, logits, {adapter param: grad}, layer dtypes) for one combination."""
    model.train(mode == "train")
    if merged:
        model.merge_adapter()
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(mode != "no_grad")
    seen, handles = record_output_dtypes(model, autocast)
    model.to(device)
    ids = ids.to(device)
    context = torch.autocast(device, dtype=autocast) if autocast else torch.autocast(device, enabled=False)
    grad_mode = torch.no_grad() if mode == "no_grad" else torch.enable_grad()
    with grad_mode, context:
        out = model(inputs_embeds=embeds, labels=ids)
    for h in handles:
        h.remove()
    grads = {}
    if mode != "no_grad":
        out.loss.backward()
        assert embeds.grad is not None and torch.isfinite(embeds.grad).all()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    grads = {n: g.cpu() if g is not None else None for n, g in grads.items()}
    return out.loss.detach().double().cpu(), out.logits.detach().double().cpu(), grads, seen


BASE_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
AUTOCASTS = [None, torch.bfloat16, torch.float16]
# The CPU always; the same matrix on CUDA (fp16 and bf16 autocast) when there is a GPU
# (benchmarks/gpu_check.sh runs it there).
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
COMBINATIONS = list(itertools.product(DEVICES, BASE_DTYPES, AUTOCASTS, [0.0, 0.1], ["train", "eval", "no_grad"],
                                      ["dora", "magnitude", "lora"], [False, True]))


def _id(case):
    device, base, autocast, p, mode, method, merged = case
    names = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", None: "off"}
    return (f"{device}-{method}-base_{names[base]}-autocast_{names[autocast]}-p{p}-{mode}-"
            f"{'merged' if merged else 'unmerged'}")


@pytest.fixture(scope="module")
def references():
    """fp32, no autocast, per (method, dropout, mode): the answers every combination is held to."""
    ids = torch.randint(0, 96, (3, 11), generator=torch.Generator().manual_seed(3))
    cache = {}

    def get(method, p, mode):
        key = (method, p, mode)
        if key not in cache:
            cache[key] = run(adapted_model(method, p), ids, mode, merged=False, autocast=None)
        return cache[key]

    return ids, get


@pytest.fixture(scope="module")
def models():
    cache = {}

    def get(method, p, base):
        key = (method, p, base)
        if key not in cache:
            cache[key] = cast_base(adapted_model(method, p), base)
        return copy.deepcopy(cache[key])

    return get


@pytest.mark.parametrize("case", COMBINATIONS, ids=[_id(c) for c in COMBINATIONS])
def test_precision_matrix(case, references, models):
    device, base, autocast, p, mode, method, merged = case
    ids, reference = references
    # A merged layer applies W' = g V to x: no dropout in any mode, so its reference is eval's.
    ref_mode = "eval" if merged and mode == "train" else mode
    ref_loss, ref_logits, ref_grads, _ = reference(method, p, ref_mode)
    model = models(method, p, base)
    loss, logits, grads, seen = run(model, ids, mode, merged, autocast, device)

    compute = autocast if autocast is not None else base
    loss_tol, logit_tol, min_cosine = TOLERANCE[compute]
    assert seen and all(ours == plain for ours, plain in seen), f"layer output dtypes {set(seen)}"
    assert all(ours == compute for ours, _ in seen)
    assert torch.isfinite(loss) and abs(loss - ref_loss) <= loss_tol * abs(ref_loss), (loss.item(), ref_loss.item())
    scale = ref_logits.abs().max()
    assert (logits - ref_logits).abs().max() <= logit_tol * scale
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert param.dtype == torch.float32, name
    if merged or mode == "no_grad":
        assert all(g is None for g in grads.values())  # a merged adapter is out of the graph
        return
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        assert grad is not None and grad.dtype == torch.float32, name
        cosine = nn.functional.cosine_similarity(grad.double().flatten(), ref_grads[name].double().flatten(), dim=0)
        assert cosine >= min_cosine, f"{name}: cosine {cosine.item():.6f}"


@pytest.mark.parametrize("autocast", [torch.bfloat16, torch.float16])
def test_full_dora_gradient_under_autocast(autocast):
    """dora_simple=False (gradient through the norm) under autocast: fp32 norm, same gradients."""
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(5))

    def grads(use_autocast):
        model = get_peft_model(make_tiny_llama(seed=2), DoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                                 dora_simple=False))
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
        model.train()
        context = torch.autocast("cpu", dtype=autocast) if use_autocast else torch.autocast("cpu", enabled=False)
        with context:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    ours, ref = grads(True), grads(False)
    for name in ref:
        assert ours[name].dtype == torch.float32
        cosine = nn.functional.cosine_similarity(ours[name].flatten(), ref[name].flatten(), dim=0)
        assert cosine >= TOLERANCE[autocast][2], name


def test_norm_stays_fp32_under_autocast():
    """autocast must not round n = ||W + sBA|| (its matmuls) to half precision."""
    model = adapted_model("dora", 0.0)
    layer = next(m for m in model.modules() if isinstance(m, AdapterLayer))
    layer.invalidate_norm_cache()
    plain = layer.direction_norm().clone()
    layer.invalidate_norm_cache()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = layer.direction_norm()
    assert under_autocast.dtype == torch.float32
    torch.testing.assert_close(under_autocast, plain, rtol=1e-6, atol=0)


@pytest.mark.parametrize("grad", [False, True])
def test_small_magnitude_update_is_not_rounded_away_in_bf16(grad):
    """g = 1.003 rounds to 1.0 in bf16 (its neighbours are 1 and 1.0078). Applied unrounded, each
    bf16 output is h * 1.003 correctly rounded, so over many outputs the mean ratio is 1.003."""
    model = adapted_model("magnitude", 0.0)
    layer = next(m for m in model.modules() if isinstance(m, AdapterLayer))
    cast_base(model, torch.bfloat16)
    with torch.no_grad():
        layer.weight_m_wdecomp.weight.copy_(layer.direction_norm().unsqueeze(1) * 1.003)
    x = torch.randn(4096, layer.in_features, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    with torch.set_grad_enabled(grad):
        y = layer(x).double()
        h = layer.base_layer(x).double()
    ratio = (y.abs().sum() / h.abs().sum()).item()
    assert abs(ratio - 1.003) < 3e-4, ratio


def test_mismatched_dtypes_without_autocast_is_one_clear_error():
    model = adapted_model("dora", 0.0)
    layer = next(m for m in model.modules() if isinstance(m, AdapterLayer))
    with pytest.raises(PrecisionError, match="input is torch.bfloat16 but the base weight is torch.float32"):
        layer(torch.randn(2, layer.in_features, dtype=torch.bfloat16))


def test_meta_device_layer_runs_without_autocast_queries():
    """Shape-only runs on the meta device (autocast has no meta backend to ask)."""
    from peft.tuners.dora import DoraLinear

    layer = DoraLinear(nn.Linear(8, 6, device="meta"), r=2, lora_alpha=4)
    y = layer(torch.empty(3, 8, device="meta"))
    assert y.device.type == "meta" and y.shape == (3, 6)
