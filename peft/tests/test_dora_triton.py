"""The Triton kernels of ``dora_triton`` against float64 references, and DoraLinear on them.

Without a GPU the kernels run in Triton's interpreter. ``TRITON_INTERPRET=1`` has to be set
before triton is imported, so the checks run in one subprocess (this file as a script),
which reports each check's outcome as JSON. On a machine with CUDA the same checks also
run in-process on the GPU, plus bf16 and torch.compile checks. The torch fallback paths
get the same checks in-process on CPU.

Every check compares against float64 math on the very inputs the kernel saw, so the
tolerances are a few roundings of the output dtype.
"""
import contextlib
import importlib.util
import itertools
import json
import warnings
import os
import subprocess
import sys
import traceback

import pytest
import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.join(os.path.dirname(HERE), "src")
if SRC not in sys.path:  # as a script (the interpreter subprocess) there is no conftest
    sys.path.insert(0, SRC)
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from peft.tuners import dora_kernels  # noqa: E402
from peft.tuners import dora_triton as dt  # noqa: E402

from test_dora_layer import FixedMaskDropout, make_layer, reference_forward  # noqa: E402

HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_CUDA = torch.cuda.is_available()
pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")

# Odd sizes on purpose: nothing is a multiple of a tile.
T, OUT = 37, 50
# Allowed error in units of the output dtype's epsilon (relative to the largest value).
ULPS = {torch.float32: 16 * 2.0**-23, torch.bfloat16: 2 * 2.0**-8, torch.float16: 2 * 2.0**-10}


def _close(ours, ref, dtype, scale=None, msg=""):
    """ours (any dtype) equals the float64 ``ref`` to a few roundings of ``dtype``."""
    tol = ULPS[dtype]
    scale = ref.abs().max().item() if scale is None else scale
    torch.testing.assert_close(ours.double(), ref, rtol=tol, atol=tol * max(scale, 1e-30), msg=msg)


def _generator(seed):
    return torch.Generator().manual_seed(seed)


def _randn(*shape, dtype, device, gen):
    return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)


# ---- kernel checks (each takes the device; the caller decides which path is expected) -----
def check_scale_columns(device):
    for dtype in (torch.float32, torch.bfloat16):
        for with_bias in (False, True):
            gen = _generator(1 + with_bias)
            h = _randn(T, OUT, dtype=dtype, device=device, gen=gen)
            g = _randn(OUT, dtype=torch.float32, device=device, gen=gen)
            bias = _randn(OUT, dtype=dtype, device=device, gen=gen) if with_bias else None
            ref = h.double() * g.double() + (bias.double() if with_bias else 0)
            msg = f"{dtype} bias={with_bias}"
            kept = h.clone()
            y = dt.scale_columns_(h, g, bias, out=torch.empty_like(h))
            assert torch.equal(h, kept), "out= must leave h intact"
            _close(y, ref, dtype, msg=msg)
            y = dt.scale_columns_(h, g, bias)
            assert y.data_ptr() == h.data_ptr() and y.dtype == dtype
            _close(y, ref, dtype, msg=msg + " in place")
            # a strided (transposed) h: in place must still land in h
            h_t = kept.t().contiguous().t()
            y = dt.scale_columns_(h_t, g, bias)
            assert y is h_t
            _close(h_t, ref, dtype, msg=msg + " strided")


def check_compose_dropout_forward(device):
    for dtype in (torch.float32, torch.bfloat16):
        for with_bias in (False, True):
            gen = _generator(10 + with_bias)
            base, p = (_randn(T, OUT, dtype=dtype, device=device, gen=gen) for _ in range(2))
            g1 = torch.rand(OUT, generator=gen).to(device) - 0.5
            bias = _randn(OUT, dtype=dtype, device=device, gen=gen) if with_bias else None
            ref = base.double() + g1.double() * p.double() + (bias.double() if with_bias else 0)
            p_before = p.clone()
            y = dt.compose_dropout_forward(base, p, g1, bias)
            msg = f"{dtype} bias={with_bias}"
            assert y.dtype == dtype and y.shape == (T, OUT) and y.data_ptr() == base.data_ptr(), msg
            assert torch.equal(p, p_before), "p is kept for backward: it must stay intact"
            # y's terms are rounded once each on the torch path: scale by their sizes
            scale = (ref.abs() + p.double().abs()).max().item()
            _close(y, ref, dtype, scale=2 * scale, msg=msg)


def check_compose_backward(device):
    for dtype in (torch.float32, torch.bfloat16):
        for with_g1 in (False, True):
            for divide in (False, True):
                gen = _generator(20 + 2 * with_g1 + divide)
                dy, h = (_randn(T, OUT, dtype=dtype, device=device, gen=gen) for _ in range(2))
                g = 0.5 + torch.rand(OUT, generator=gen).to(device)
                g[4], g[7] = -0.75, 1e-3  # any sign; small but far from underflow
                g1 = g - 1
                # as in the layer: the saved tensor is h, or the output y = g * h rounded to dtype
                saved = dt.scale_columns_(h.clone(), g) if divide else h
                dyg, dyg1, grad_g = dt.compose_backward(dy, saved, g, g1 if with_g1 else None, divide)
                msg = f"{dtype} g1={with_g1} divide={divide}"
                products = dy.double() * h.double()
                ref_g = products.sum(0)  # the formula: sum_T(dy * h), whatever was saved
                assert grad_g.dtype in (torch.float32, torch.float64) and grad_g.shape == (OUT,)
                # The kernel multiplies and adds in fp32; the torch path rounds each product to
                # the activation dtype first (no fp32 copy of [T, out]), then adds in fp32; a
                # saved y was rounded to the activation dtype once more.
                product_dtype = torch.float32 if dt.use_triton(dy) and not divide else dtype
                _close(grad_g, ref_g, product_dtype, scale=2 * products.abs().sum(0).max().item(), msg=msg + " grad_g")
                _close(dyg, dy.double() * g.double(), dtype, msg=msg + " dyg")
                if with_g1:
                    _close(dyg1, dy.double() * g1.double(), dtype, msg=msg + " dyg1")
                else:
                    assert dyg1 is None
    # dy as autograd hands it over from .sum(): an expanded, stride-0 tensor
    dy = torch.ones(1, 1, device=device).expand(T, OUT)
    saved = torch.randn(T, OUT, generator=_generator(30)).to(device)
    g = 0.5 + torch.rand(OUT, generator=_generator(31)).to(device)
    dyg, _, grad_g = dt.compose_backward(dy, saved, g, need_dyg=False)
    assert dyg is None
    _close(grad_g, saved.double().sum(0), torch.float32, scale=saved.abs().sum(0).max().item())


def check_compose_backward_multi_tile_programs(device):
    """Programs that loop over several row tiles each, and several partial rows to add."""
    previous = dt._REDUCTION_PROGRAMS
    dt._REDUCTION_PROGRAMS = 3  # 300 rows: 10 tiles -> 3 programs of 4 tiles each
    try:
        gen = _generator(40)
        dy, saved = (_randn(300, 20, dtype=torch.float32, device=device, gen=gen) for _ in range(2))
        g = 0.5 + torch.rand(20, generator=gen).to(device)
        dyg, _, grad_g = dt.compose_backward(dy, saved, g)
        products = dy.double() * saved.double()
        _close(grad_g, products.sum(0), torch.float32, scale=products.abs().sum(0).max().item())
        _close(dyg, dy.double() * g.double(), torch.float32)
        _, _, again = dt.compose_backward(dy, saved, g)
        assert torch.equal(again, grad_g), "the column sums must be deterministic"
    finally:
        dt._REDUCTION_PROGRAMS = previous


class _CountCalls:
    """Wraps a dora_kernels dispatch function and counts its calls (proves the wiring)."""

    def __init__(self, name):
        self.name, self.fn, self.calls = name, getattr(dora_kernels, name), 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.fn(*args, **kwargs)


LAYER_CASES = [  # (r, bias, simple, p, input lead dims)
    (4, True, True, 0.0, (5,)),
    (4, False, False, 0.0, (2, 3)),
    (4, True, True, 0.3, (2, 3)),
    (8, False, False, 0.3, (7,)),
    (0, True, True, 0.3, (6,)),  # magnitude-only
    (0, False, True, 0.0, (4,)),
]


def _run_layer(layer, x, dy):
    for param in layer.parameters():
        param.grad = None
    x = x.detach().clone().requires_grad_(True)
    y = layer(x)
    y.backward(dy)
    grads = {name: param.grad.clone() for name, param in layer.named_parameters() if param.grad is not None}
    return y.detach(), x.grad, grads


def check_layer_triton_path_equals_torch_path(device):
    """DoraLinear forward + backward, fp32: the Triton path, the torch path, float64 math;
    each case also with some zero-magnitude rows (g = 0 there, where m still has a gradient)."""
    for (r, bias, simple, p, lead), zero_rows in itertools.product(LAYER_CASES, (False, True)):
        layer = make_layer(OUT, 24, r, bias, simple, torch.float32, seed=50 + r, p=p).to(device).train()
        if zero_rows:
            with torch.no_grad():
                layer.weight_m_wdecomp.weight[[1, 17, OUT - 1]] = 0.0
        gen = _generator(60 + r)
        x = _randn(*lead, 24, dtype=torch.float32, device=device, gen=gen)
        dy = _randn(*lead, OUT, dtype=torch.float32, device=device, gen=gen)
        mask = None
        if p:
            mask = (torch.rand(*lead, 24, generator=gen) > p).float().to(device)
            layer.lora_dropout = FixedMaskDropout(mask, p)
        assert dt.use_triton(x)
        counters = {name: _CountCalls(name) for name in ("scale_columns_", "compose_backward",
                                                         "compose_dropout_forward")}
        for name, counter in counters.items():
            setattr(dora_kernels, name, counter)
        try:
            y_tri, gx_tri, grads_tri = _run_layer(layer, x, dy)
        finally:
            for name, counter in counters.items():
                setattr(dora_kernels, name, counter.fn)
        forward_fn = "compose_dropout_forward" if p else "scale_columns_"
        assert counters[forward_fn].calls == 1 and counters["compose_backward"].calls == 1
        with dt.triton_disabled():
            assert not dt.use_triton(x)
            y_ref, gx_ref, grads_ref = _run_layer(layer, x, dy)
        case = f"r={r} bias={bias} simple={simple} p={p} zero_rows={zero_rows}"
        tol = dict(rtol=2e-5, atol=2e-5 * y_ref.abs().max().item())
        torch.testing.assert_close(y_tri, y_ref, **tol, msg=case + " y")
        torch.testing.assert_close(gx_tri, gx_ref, rtol=2e-5, atol=2e-5 * gx_ref.abs().max().item(), msg=case)
        assert grads_tri.keys() == grads_ref.keys()
        for name in grads_ref:
            torch.testing.assert_close(grads_tri[name], grads_ref[name], rtol=2e-5,
                                       atol=2e-5 * grads_ref[name].abs().max().item(), msg=f"{case} {name}")
        # and both against the dense float64 formula
        f64 = lambda t: t.detach().double().requires_grad_(True)  # noqa: E731
        W = layer.base_layer.weight.detach().double()
        b = layer.base_layer.bias.detach().double() if bias else None
        A, B = (f64(layer.lora_A.weight), f64(layer.lora_B.weight)) if r else (None, None)
        m, xr = f64(layer.magnitude), f64(x)
        x_drop = None if mask is None else xr * mask.double() / (1 - p)
        ref = reference_forward(xr, W, b, A, B, m, layer.scaling, simple, x_drop)
        ref.backward(dy.double())
        torch.testing.assert_close(y_tri.double(), ref.detach(), rtol=2e-5, atol=2e-5 * ref.abs().max().item(),
                                   msg=case + " vs float64")
        torch.testing.assert_close(grads_tri["weight_m_wdecomp.weight"].view(-1).double(), m.grad, rtol=2e-5,
                                   atol=2e-5 * m.grad.abs().max().item(), msg=case + " grad m vs float64")
        if zero_rows:  # the formula's gradient there is sum_T(dy * h) / n, not 0
            assert m.grad[[1, 17, OUT - 1]].abs().min() > 1e-3 * m.grad.abs().max(), case


def check_layer_bf16_matches_float64(device):
    """A bf16 base layer on the Triton path, within bf16 tolerance of float64 math."""
    for p in (0.0, 0.25):
        torch.manual_seed(70)
        base = nn.Linear(48, OUT, bias=True).to(device=device, dtype=torch.bfloat16)
        layer = dora_layer_cls()(base, r=8, lora_alpha=16, lora_dropout=p).train()
        with torch.no_grad():
            layer.lora_B.weight.normal_(0, 0.1)
        gen = _generator(71)
        x = _randn(T, 48, dtype=torch.bfloat16, device=device, gen=gen).requires_grad_(True)
        mask = None
        if p:
            mask = (torch.rand(T, 48, generator=gen) > p).float().to(device)
            layer.lora_dropout = FixedMaskDropout(mask, p)
        assert dt.use_triton(x)
        y = layer(x)
        dy = torch.randn(y.shape, generator=gen).to(device=device, dtype=torch.bfloat16)
        y.backward(dy)
        f64 = lambda t: t.detach().double().requires_grad_(True)  # noqa: E731
        W, b = layer.base_layer.weight.double(), layer.base_layer.bias.detach().double()
        A, B, m, xr = (f64(t) for t in (layer.lora_A.weight, layer.lora_B.weight, layer.magnitude, x))
        x_drop = None if mask is None else xr * mask.double() / (1 - p)
        ref = reference_forward(xr, W, b, A, B, m, layer.scaling, True, x_drop)
        ref.backward(dy.double())
        tol = 3e-2
        pairs = [(y, ref.detach(), "y"), (x.grad, xr.grad, "x"), (layer.lora_A.weight.grad, A.grad, "A"),
                 (layer.lora_B.weight.grad, B.grad, "B"), (layer.weight_m_wdecomp.weight.grad.view(-1), m.grad, "m")]
        for ours, theirs, name in pairs:
            torch.testing.assert_close(ours.double(), theirs, rtol=tol, atol=tol * theirs.abs().max().item(),
                                       msg=f"p={p} {name}")


def check_layer_under_autocast_triton_equals_torch(device):
    """The autocast rule (dora_kernels' docstring) on both paths: an fp32 base under bf16/fp16
    autocast gives the same output dtype, values and fp32 gradients on Triton as on torch."""
    for autocast_dtype, p, grad in itertools.product((torch.bfloat16, torch.float16), (0.0, 0.25), (True, False)):
        results = []
        for triton_on in (True, False):
            torch.manual_seed(90)
            base = nn.Linear(48, OUT, bias=True).to(device)
            layer = dora_layer_cls()(base, r=8, lora_alpha=16, lora_dropout=p).train()
            with torch.no_grad():
                layer.lora_B.weight.normal_(0, 0.1)
                layer.weight_m_wdecomp.weight.mul_(1.01)
            gen = _generator(91)
            if p:
                layer.lora_dropout = FixedMaskDropout((torch.rand(T, 48, generator=gen) > p).float().to(device), p)
            x = _randn(T, 48, dtype=torch.float32, device=device, gen=gen).requires_grad_(grad)
            path = (lambda: contextlib.nullcontext()) if triton_on else dt.triton_disabled  # noqa: E731
            with path(), torch.set_grad_enabled(grad), torch.autocast(device, dtype=autocast_dtype):
                assert dt.use_triton(x.to(autocast_dtype)) == triton_on
                y = layer(x)
            assert y.dtype == autocast_dtype, y.dtype
            grads = []
            if grad:
                with path():
                    y.float().pow(2).sum().backward()
                grads = [x.grad, layer.lora_A.weight.grad, layer.lora_B.weight.grad, layer.weight_m_wdecomp.weight.grad]
                assert [t.dtype for t in grads] == [torch.float32] * 4
            results.append([y] + grads)
        tol = ULPS[autocast_dtype] * 4
        for ours, theirs in zip(*results):
            torch.testing.assert_close(ours.double(), theirs.double(), rtol=tol, atol=tol * theirs.abs().max().item(),
                                       msg=f"{autocast_dtype} p={p} grad={grad}")


def dora_layer_cls():
    from peft.tuners.dora import DoraLinear

    return DoraLinear


KERNEL_CHECKS = {
    "scale_columns_": check_scale_columns,
    "compose_dropout_forward": check_compose_dropout_forward,
    "compose_backward": check_compose_backward,
    "compose_backward_multi_tile_programs": check_compose_backward_multi_tile_programs,
}
LAYER_CHECKS = {
    "layer_triton_path_equals_torch_path": check_layer_triton_path_equals_torch_path,
    "layer_bf16_matches_float64": check_layer_bf16_matches_float64,
    "layer_under_autocast_triton_equals_torch": check_layer_under_autocast_triton_equals_torch,
}
ALL_CHECKS = {**KERNEL_CHECKS, **LAYER_CHECKS}


def _run_checks_as_script():
    """The interpreter subprocess: run every check on CPU tensors, print {name: outcome}."""
    results = {}
    if not dt.use_triton(torch.empty(0)):
        results["_setup"] = f"use_triton is False on CPU (TRITON_INTERPRET={dt.TRITON_INTERPRET})"
    else:
        for name, check in ALL_CHECKS.items():
            try:
                check("cpu")
                results[name] = "ok"
            except Exception:  # report and go on with the other checks
                results[name] = traceback.format_exc()
    print("RESULTS " + json.dumps(results))


# ---- pytest -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def interpreter_results():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([SRC, HERE]))
    proc = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env, capture_output=True, text=True,
                          timeout=300)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULTS ")]
    assert proc.returncode == 0 and lines, f"interpreter run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    results = json.loads(lines[-1][len("RESULTS "):])
    assert "_setup" not in results, results["_setup"]
    return results


@pytest.mark.parametrize("name", list(ALL_CHECKS))
def test_kernel_under_triton_interpreter(interpreter_results, name):
    assert interpreter_results[name] == "ok", interpreter_results[name]


@pytest.mark.parametrize("name", list(KERNEL_CHECKS))
def test_torch_fallback_path_has_the_same_semantics(name):
    """The same checks on the torch path (what CPU runs without the interpreter)."""
    with dt.triton_disabled():
        assert not dt.use_triton(torch.empty(0))
        KERNEL_CHECKS[name]("cpu")


# ---- a kernel that fails cannot take a run down ----------------------------------------------
def _layer_run(p: float):
    """Output and gradients of one DoRA layer step (train mode, fixed dropout mask)."""
    torch.manual_seed(95)
    layer = dora_layer_cls()(nn.Linear(48, OUT), r=8, lora_alpha=16, lora_dropout=p).train()
    with torch.no_grad():
        layer.lora_B.weight.normal_(0, 0.1)
    gen = _generator(96)
    if p:
        layer.lora_dropout = FixedMaskDropout((torch.rand(T, 48, generator=gen) > p).float(), p)
    x = torch.randn(T, 48, generator=gen).requires_grad_(True)
    y = layer(x)
    y.pow(2).sum().backward()
    with torch.no_grad():
        y_eval = layer.eval()(x)
    return [y, y_eval, x.grad, layer.lora_A.weight.grad, layer.lora_B.weight.grad, layer.weight_m_wdecomp.weight.grad]


@pytest.fixture
def failing_triton(monkeypatch):
    """Make CPU tensors take the Triton path without the interpreter: every launch then fails
    for real (no GPU driver), as a compile error or an unsupported GPU would on a real one."""
    if not HAS_TRITON or HAS_CUDA:
        pytest.skip("needs triton installed and no GPU (a CPU launch must fail)")
    monkeypatch.setattr(dt, "TRITON_INTERPRET", True)
    monkeypatch.setattr(dt, "KERNEL_MODE", "auto")
    monkeypatch.setattr(dt, "_failure", None)
    return monkeypatch


@pytest.mark.parametrize("p", [0.0, 0.25])
def test_failed_kernel_falls_back_to_torch_with_one_warning(failing_triton, p):
    with dt.triton_disabled():
        expected = _layer_run(p)
    assert dt.kernel_path() == "triton" and dt.use_triton(torch.empty(0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = _layer_run(p)
        again = _layer_run(p)
    ours = [w for w in caught if "Triton kernel" in str(w.message)]
    assert len(ours) == 1, [str(w.message) for w in caught]
    assert "uses the torch path from now on" in str(ours[0].message)
    assert dt.kernel_path().startswith("torch (Triton failed: ") and not dt.use_triton(torch.empty(0))
    for a, b, c in zip(got, again, expected):
        assert torch.equal(a, c) and torch.equal(b, c)


def test_kernel_failure_is_an_error_when_triton_is_required(failing_triton):
    failing_triton.setattr(dt, "KERNEL_MODE", "1")
    with pytest.raises(RuntimeError):
        _layer_run(0.0)
    assert dt.kernel_path() == "triton"  # no silent switch


@pytest.mark.parametrize("value,expected", [("0", "torch (DORA_TRITON=0)"), ("1", "triton"), ("auto", "triton")])
def test_dora_triton_environment_switch(value, expected):
    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    code = ("import torch; from peft.tuners import dora_triton as dt; "
            "print(dt.kernel_path(), '|', dt.use_triton(torch.empty(0)))")
    env = dict(os.environ, TRITON_INTERPRET="1", DORA_TRITON=value, PYTHONPATH=SRC)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    path, uses = proc.stdout.strip().rsplit(" | ", 1)
    assert path == expected and uses == str(value != "0")


def test_bad_dora_triton_value_is_one_clear_error():
    env = dict(os.environ, DORA_TRITON="yes", PYTHONPATH=SRC)
    proc = subprocess.run([sys.executable, "-c", "import peft.tuners.dora_triton"], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode != 0 and "DORA_TRITON must be auto, 0 or 1, got 'yes'" in proc.stderr


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", list(ALL_CHECKS))
def test_kernel_on_gpu(name):
    ALL_CHECKS[name]("cuda")


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_traces_the_triton_path_on_gpu(backend):
    """The autograd functions with their Triton kernels inside torch.compile (no graph break)."""
    gen = _generator(80)
    W = torch.randn(OUT, 24, generator=gen).cuda()
    bias = torch.randn(OUT, generator=gen).cuda()
    A = torch.randn(4, 24, generator=gen).cuda().requires_grad_(True)
    B = torch.randn(OUT, 4, generator=gen).cuda().requires_grad_(True)
    m = (1 + torch.rand(OUT, generator=gen)).cuda().requires_grad_(True)
    mask = (torch.rand(T, 24, generator=gen) > 0.3).float().cuda()

    def loss(x):
        n = (W + 0.5 * B @ A).norm(dim=1).detach()
        g = m / n
        y = dora_kernels.DoraLinearFunction.apply(x, W, bias, A, B, g, 0.5)
        y = y + dora_kernels.DoraLinearFunction.apply(x, W, None, A, B, g, 0.5)
        y = y + dora_kernels.DoraDropoutLinearFunction.apply(x, x * mask, W, bias, A, B, g, (m - n) / n, 0.5)
        return y.pow(2).sum()

    x = torch.randn(T, 24, generator=gen).cuda().requires_grad_(True)
    eager = torch.autograd.grad(loss(x), (x, A, B, m))
    compiled = torch.compile(loss, backend=backend, fullgraph=True)
    ours = torch.autograd.grad(compiled(x), (x, A, B, m))
    for a, b in zip(ours, eager):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item())


if __name__ == "__main__":
    _run_checks_as_script()
