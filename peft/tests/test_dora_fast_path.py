"""The hand-written DoRA forward/backward: memory, caching, precision, compile, checkpointing."""
import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from peft.tuners import dora_kernels
from peft.tuners.dora import DoraLinear
from peft.tuners.dora_kernels import DoraLinearFunction

from test_dora_layer import FixedMaskDropout, make_layer, reference_forward


class LargestTensorCreated(TorchDispatchMode):
    """Records the largest tensor any aten op allocates while active (views allocate nothing)."""

    def __init__(self):
        super().__init__()
        self.largest = 0
        self.op = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = torch.utils._pytree.tree_leaves((args, kwargs or {}))
        input_storages = {t.untyped_storage().data_ptr() for t in inputs if isinstance(t, torch.Tensor)}
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if not isinstance(t, torch.Tensor) or t.untyped_storage().data_ptr() in input_storages:
                continue  # a view of an input, or an in-place result: no new memory
            if t.numel() > self.largest:
                self.largest, self.op = t.numel(), str(func)
        return out


@pytest.mark.parametrize("p,simple", [(0.0, True), (0.0, False), (0.2, True), (0.2, False)])
def test_no_out_by_in_temporary_in_forward_or_backward(p, simple):
    out_f, in_f, tokens = 96, 80, 4  # out x in dwarfs every activation
    torch.manual_seed(0)
    layer = DoraLinear(nn.Linear(in_f, out_f), r=4, lora_alpha=8, lora_dropout=p, dora_simple=simple).train()
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(tokens, in_f, requires_grad=True)
    with LargestTensorCreated() as mode:
        layer(x).sum().backward()
    assert mode.largest < out_f * in_f, f"{mode.op} made a tensor of {mode.largest} elements"


def test_eval_forward_makes_no_out_by_in_temporary_and_one_matmul():
    layer = make_layer(96, 80, 4, True, True, torch.float32, seed=0, p=0.3).eval()
    matmuls = []

    class CountMatmuls(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if "mm" in str(func) and tuple(args[1].shape) == (80, 96):  # x @ W^T: a base matmul
                matmuls.append(str(func))
            return out

    x = torch.randn(4, 80)
    with torch.no_grad(), LargestTensorCreated() as mode:
        layer(x)
    assert mode.largest < 96 * 80
    layer.train()
    layer.lora_dropout = nn.Identity()
    with torch.no_grad(), CountMatmuls():
        layer(x)
    assert len(matmuls) == 1  # W x only (B's product is rank r and is added in place)


def dense_norm(layer):
    return (layer.base_layer.weight + layer.scaling * layer.lora_B.weight @ layer.lora_A.weight).norm(dim=1).detach()


@pytest.mark.parametrize("optimizer_kwargs", [dict(foreach=True), dict(foreach=False), dict(fused=True)])
def test_evaluation_reuses_the_norm_until_any_optimizer_steps(optimizer_kwargs):
    """Forwards without autograd reuse n; an optimizer step of any kind refreshes it, fused AdamW's
    too (it leaves version counters alone), even with an evaluation between backward and step."""
    layer = make_layer(16, 12, 4, False, True, torch.float32, seed=2).train()
    opt = torch.optim.AdamW([p for p in layer.parameters() if p.requires_grad], lr=0.1, **optimizer_kwargs)
    for _ in range(3):
        layer(torch.randn(3, 12)).pow(2).sum().backward()
        with torch.no_grad():
            n = layer.direction_norm()
            layer.eval()(torch.randn(2, 12))
            assert layer.direction_norm() is n  # reused
        opt.step()
        opt.zero_grad()
        layer.train()
        with torch.no_grad():
            torch.testing.assert_close(layer.direction_norm(), dense_norm(layer), atol=1e-5, rtol=1e-5)


def test_training_forwards_never_read_a_cached_norm():
    layer = make_layer(16, 12, 4, False, True, torch.float64, seed=1).train()
    with torch.no_grad():
        layer.direction_norm()  # cached now
        layer.lora_B.weight.data.mul_(2)  # through .data: no version bump, so no cache key sees it
    x = torch.randn(3, 12, dtype=torch.float64)
    W, A, B = layer.base_layer.weight, layer.lora_A.weight, layer.lora_B.weight
    expected = reference_forward(x, W, None, A, B, layer.magnitude, layer.scaling, True)
    torch.testing.assert_close(layer(x), expected)


def test_gradient_accumulation_equals_one_big_batch():
    torch.manual_seed(3)
    x = torch.randn(8, 12)
    big = make_layer(16, 12, 4, True, True, torch.float64, seed=4).train()
    small = make_layer(16, 12, 4, True, True, torch.float64, seed=4).train()
    big(x.double()).pow(2).sum().backward()
    for part in x.double().split(2):
        small(part).pow(2).sum().backward()
    for (name, a), (_, b) in zip(big.named_parameters(), small.named_parameters()):
        if a.requires_grad:
            torch.testing.assert_close(a.grad, b.grad, msg=name)


@pytest.mark.parametrize("p", [0.0, 0.25])
def test_bf16_base_matches_float64_reference_within_bf16_tolerance(p):
    torch.manual_seed(5)
    layer = DoraLinear(nn.Linear(48, 40, bias=False).to(torch.bfloat16), r=8, lora_alpha=16, lora_dropout=p).train()
    with torch.no_grad():
        layer.lora_B.weight.normal_(0, 0.1)
    x = torch.randn(6, 48, dtype=torch.bfloat16, requires_grad=True)
    mask = None
    if p:
        mask = (torch.rand(6, 48) > p).float()
        layer.lora_dropout = FixedMaskDropout(mask, p)
    y = layer(x)
    dy = torch.randn_like(y)
    y.backward(dy)
    W = layer.base_layer.weight.double()
    A = layer.lora_A.weight.detach().double().requires_grad_()
    B = layer.lora_B.weight.detach().double().requires_grad_()
    m = layer.magnitude.detach().double().requires_grad_()
    xr = x.detach().double().requires_grad_()
    x_drop = None if mask is None else xr * mask.double() / (1 - p)
    ref = reference_forward(xr, W, None, A, B, m, layer.scaling, True, x_drop)
    ref.backward(dy.double())
    tol = 3e-2
    torch.testing.assert_close(y.double(), ref.detach(), atol=tol * ref.abs().max().item(), rtol=tol)
    for ours, theirs in [(x.grad, xr.grad), (layer.lora_A.weight.grad, A.grad), (layer.lora_B.weight.grad, B.grad),
                         (layer.weight_m_wdecomp.weight.grad.view(-1), m.grad)]:
        torch.testing.assert_close(ours.double(), theirs, atol=tol * theirs.abs().max().item(), rtol=tol)


@pytest.mark.parametrize("p", [0.0, 0.2])
def test_torch_compile_gives_the_same_outputs_and_gradients(p):
    eager = make_layer(16, 12, 4, True, False, torch.float32, seed=6, p=p).train()
    compiled_layer = make_layer(16, 12, 4, True, False, torch.float32, seed=6, p=p).train()
    if p:  # the same mask in both, so the comparison is exact
        mask = (torch.rand(5, 12) > p).float()
        eager.lora_dropout = FixedMaskDropout(mask, p)
        compiled_layer.lora_dropout = FixedMaskDropout(mask, p)
    compiled = torch.compile(compiled_layer, backend="aot_eager", fullgraph=True)
    x = torch.randn(5, 12)
    y1, y2 = eager(x), compiled(x)
    torch.testing.assert_close(y2, y1)
    y1.sum().backward()
    y2.sum().backward()
    for (name, a), (_, b) in zip(eager.named_parameters(), compiled_layer.named_parameters()):
        if a.requires_grad:
            torch.testing.assert_close(b.grad, a.grad, msg=name)


class RecordOps(TorchDispatchMode):
    """Records every aten op; ``host_reads`` are those that copy a value back to Python
    (``.item()``, ``bool(t)``: a host sync on a GPU)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append((str(func), [tuple(a.shape) for a in args if isinstance(a, torch.Tensor)]))
        return func(*args, **(kwargs or {}))

    def host_reads(self):
        return [name for name, _ in self.ops if "_local_scalar_dense" in name]

    def matmuls(self, *shapes):
        return [name for name, arg_shapes in self.ops if "mm" in name and arg_shapes[-2:] == list(shapes)]


T_, IN_, OUT_, R_ = 6, 10, 12, 4
SMALL_ROWS = [0, 5, 11]


def no_bias_inputs(small: str, seed: int = 0):
    """x, W, A, B, g (fp32, A, B, g and x needing grad), g = 0 or 1e-30 on SMALL_ROWS when asked."""
    gen = torch.Generator().manual_seed(seed)
    x, A, B = (torch.randn(*shape, generator=gen) for shape in [(T_, IN_), (R_, IN_), (OUT_, R_)])
    W = torch.randn(OUT_, IN_, generator=gen)
    g = 0.5 + torch.rand(OUT_, generator=gen)
    g[SMALL_ROWS] = {"none": g[SMALL_ROWS], "zero": 0.0, "tiny": 1e-30}[small]  # 1e-30 < sqrt(fp32 tiny)
    return [t.requires_grad_(t is not W) for t in (x, W, A, B, g)]


def check_grads_against_float64(x, W, A, B, g, s, dy):
    """Every gradient against the dense float64 formula y = g * (x W^T + s x A^T B^T)."""
    leaves = [t.detach().double().requires_grad_() for t in (x, A, B, g)]
    xr, Ar, Br, gr = leaves
    (gr * (xr @ W.double().T + s * (xr @ Ar.T) @ Br.T)).backward(dy.double())
    for ours, ref in zip((x.grad, A.grad, B.grad, g.grad), leaves):
        torch.testing.assert_close(ours.double(), ref.grad, rtol=2e-5, atol=2e-5 * ref.grad.abs().max().item())
    assert gr.grad[SMALL_ROWS].abs().min() > 1e-3 * gr.grad.abs().max()  # sum_T(dy * h), not 0


@pytest.mark.parametrize("small", ["none", "zero", "tiny"])
def test_no_bias_forward_reads_nothing_back_keeps_the_output_and_gets_the_formula(small):
    """Without a bias the forward saves its output y (not h) whatever g is, and reads no value back
    to the host (one sync per layer on a GPU); backward reads the small-|g| flag once and, only
    when some |g| is small, recomputes h with one more base matmul. Gradients: float64 formula."""
    x, W, A, B, g = no_bias_inputs(small)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        with RecordOps() as forward:
            y = DoraLinearFunction.apply(x, W, None, A, B, g, 0.7)
    assert forward.host_reads() == []
    activations = [t for t in saved if t.shape == y.shape]
    assert activations and all(t.untyped_storage().data_ptr() == y.untyped_storage().data_ptr() for t in activations)
    dy = torch.randn_like(y)
    with RecordOps() as backward:
        y.backward(dy)
    assert len(backward.host_reads()) == 1
    assert len(backward.matmuls((T_, IN_), (IN_, OUT_))) == (small != "none")  # x W^T again, or not
    check_grads_against_float64(x, W, A, B, g, 0.7, dy)


class CopyLandsOnSynchronize:
    """A stand-in for the CUDA event after a non-blocking copy: the host copy holds a stale value
    until ``synchronize``, as a real one may; counts the calls."""

    def __init__(self, host, value):
        self.host, self.value, self.synchronized = host, value, 0

    def synchronize(self):
        self.synchronized += 1
        self.host.copy_(self.value)


@pytest.mark.parametrize("small", ["none", "zero"])
def test_an_asynchronously_copied_flag_is_waited_for_in_backward_only(small, monkeypatch):
    """The CUDA branch of SmallMagnitudeFlag, run on the CPU: forward starts the copy and does not
    wait; backward waits once before reading (a stale read would divide by g = 0, or recompute)."""
    events = []

    def copy_to_host(flag):
        host = torch.logical_not(flag)  # stale: the opposite of the true value
        events.append(CopyLandsOnSynchronize(host, flag.clone()))
        return host, events[-1]

    monkeypatch.setitem(dora_kernels._ASYNC_HOST_COPY, "cpu", copy_to_host)
    x, W, A, B, g = no_bias_inputs(small, seed=1)
    y = DoraLinearFunction.apply(x, W, None, A, B, g, 0.7)
    assert len(events) == 1 and events[0].synchronized == 0
    dy = torch.randn_like(y)
    with RecordOps() as backward:
        y.backward(dy)
    assert events[0].synchronized == 1
    assert len(backward.matmuls((T_, IN_), (IN_, OUT_))) == (small != "none")
    check_grads_against_float64(x, W, A, B, g, 0.7, dy)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_no_bias_forward_never_synchronizes():
    """On a GPU, the forward of a layer with a zero magnitude row makes no synchronizing call."""
    x, W, A, B, g = (t.detach().cuda().requires_grad_(t.requires_grad) for t in no_bias_inputs("zero", seed=2))
    DoraLinearFunction.apply(x, W, None, A, B, g, 0.7)  # warm-up: first Triton compile, allocators
    torch.cuda.set_sync_debug_mode("error")
    try:
        y = DoraLinearFunction.apply(x, W, None, A, B, g, 0.7)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    dy = torch.randn_like(y)
    y.backward(dy)
    check_grads_against_float64(x, W, A, B, g, 0.7, dy)
