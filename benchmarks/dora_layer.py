r"""Speed and peak memory of ONE adapted linear layer: our DoRA/LoRA vs HF peft vs the original.

Implementations compared (same random W, A, B and magnitude m in every one, seeded):

* ``ours_dora``      -- this repo's ``DoraLinear`` (``peft/src``), ``dora_simple=True``
* ``ours_lora``      -- this repo's ``LoraLinear``
* ``hf_dora``        -- HF peft (site-packages) ``LoraConfig(use_dora=True)`` via ``get_peft_model``
* ``hf_lora``        -- HF peft plain LoRA
* ``original_dora``  -- the NVlabs formulation, written here as :class:`OriginalDoraLinear`:
                        V = W + s B A built densely every forward, two base matmuls
* ``frozen_linear``  -- the frozen ``nn.Linear`` alone (forward + input gradient): the floor

Each measurement runs in its own worker process (both this repo's fork and HF peft import as
``peft``), timed interleaved with the other implementations' workers and reported as medians;
peak memory is the bytes allocated during one untimed iteration. ``harness.py`` says how.

Modes: ``train`` (x requires grad, loss = (y * dy).sum(), backward; adapter grads reset to
None before every iteration) at dropout 0 and 0.05, and ``eval`` (module.eval(), forward
under ``torch.no_grad()``). Our DoRA caches its norm n until A/B change; a benchmark that
never updates A/B would reuse it forever, so every timed iteration drops that cache
(``_norm_cache = None``) and pays for the norm as a training step would. HF peft's DoRA
cache is off by default, so it recomputes too.

Usage::

    python benchmarks/dora_layer.py --quick             # 512x512 smoke test
    python benchmarks/dora_layer.py                     # CPU fp32 reduced shapes
    python benchmarks/dora_layer.py --device cuda       # LLaMA-7B shapes, bf16
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from harness import (
    DEFAULT_RESULTS_DIR,
    Worker,
    check_peft_origin,
    machine_info,
    measure_peak_bytes,
    run_interleaved,
    select_peft,
    synchronize,
    worker_serve,
    write_result,
)

IMPLEMENTATIONS = ["ours_dora", "ours_lora", "hf_dora", "hf_lora", "original_dora", "frozen_linear"]
# (mode, dropout) configurations measured for every shape and rank.
MODES = [("train", 0.0), ("train", 0.05), ("eval", 0.0)]
CPU_SHAPES = [(2048, 2048), (2048, 5504)]
CPU_RANKS = [8, 32]
CPU_TOKENS = 2048
QUICK_SHAPES = [(512, 512)]
QUICK_RANKS = [8]
QUICK_TOKENS = 256
GPU_SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096)]
GPU_RANKS = [8, 16, 32, 64]
GPU_TOKENS = 16 * 256
PROBE_TOKENS = 256  # rows of the eval input whose outputs are compared across implementations


# ============================================================================================
# The layers (worker side)
# ============================================================================================
def make_original_dora_class():
    import torch
    import torch.nn.functional as F
    from torch import nn

    class OriginalDoraLinear(nn.Module):
        """The NVlabs DoRA forward, as the original repo computes it (reference only).

        V = W + s B A is formed densely (fp32, as the adapters) every forward; n = ||V|| per
        row (detached with dora_simple); two base matmuls:
        ``org = x W^T; y = org + (g - 1) * (drop(x) W^T) + g * s * B A drop(x)``.
        """

        def __init__(self, weight, r: int, lora_alpha: float, lora_dropout: float, dora_simple: bool = True):
            super().__init__()
            out_features, in_features = weight.shape
            self.weight = nn.Parameter(weight, requires_grad=False)
            self.scaling = lora_alpha / r
            self.dora_simple = dora_simple
            self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
            device = weight.device
            self.lora_A = nn.Linear(in_features, r, bias=False, device=device, dtype=torch.float32)
            self.lora_B = nn.Linear(r, out_features, bias=False, device=device, dtype=torch.float32)
            self.weight_m_wdecomp = nn.Linear(1, out_features, bias=False, device=device, dtype=torch.float32)

        def forward(self, x):
            previous_dtype = x.dtype
            new_weight_v = self.weight + (self.lora_B.weight @ self.lora_A.weight) * self.scaling
            norm = torch.linalg.norm(new_weight_v, dim=1)
            if self.dora_simple:
                norm = norm.detach()
            norm_scale = self.weight_m_wdecomp.weight.view(-1) / norm
            org_result = F.linear(x, self.weight)
            dropout_x = self.lora_dropout(x)
            result = org_result + (norm_scale - 1) * F.linear(dropout_x, self.weight)
            lora = self.lora_B(self.lora_A(dropout_x.to(self.lora_A.weight.dtype)))
            result = result + norm_scale * lora * self.scaling
            return result.to(previous_dtype)

    return OriginalDoraLinear


def make_shared_weights(in_features, out_features, rank, lora_alpha, tokens, seed):
    """W, A, B, m, x, dy in fp32 on CPU, identical in every worker (seeded)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=generator) / math.sqrt(in_features)
    lora_A = torch.randn(rank, in_features, generator=generator) / math.sqrt(in_features)
    lora_B = torch.randn(out_features, rank, generator=generator) * 0.05
    scaling = lora_alpha / rank
    direction_norm = (weight + scaling * lora_B @ lora_A).norm(dim=1)
    magnitude = direction_norm * (1.0 + 0.1 * torch.rand(out_features, generator=generator))
    x = torch.randn(tokens, in_features, generator=generator)
    dy = torch.randn(tokens, out_features, generator=generator)
    return weight, lora_A, lora_B, magnitude, x, dy


def build_layer(implementation, weight, lora_A, lora_B, magnitude, rank, lora_alpha, dropout):
    """The adapted layer for ``implementation``, with the shared weights copied in.

    Returns (layer, trainable parameters, hook run before each timed iteration).
    """
    import torch
    from torch import nn

    out_features, in_features = weight.shape

    def frozen_linear():
        linear = nn.Linear(in_features, out_features, bias=False, device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(weight)
        linear.weight.requires_grad_(False)
        return linear

    before_iteration = lambda: None  # noqa: E731
    if implementation == "frozen_linear":
        layer = frozen_linear()
    elif implementation in ("ours_dora", "ours_lora"):
        from peft.tuners.dora import DoraLinear
        from peft.tuners.lora import LoraLinear

        if implementation == "ours_dora":
            layer = DoraLinear(frozen_linear(), r=rank, lora_alpha=lora_alpha, lora_dropout=dropout, dora_simple=True)
            with torch.no_grad():
                layer.weight_m_wdecomp.weight.copy_(magnitude.view(-1, 1))

            def before_iteration():  # a training step changes A, B: the cached norm is stale
                layer._norm_cache = None

        else:
            layer = LoraLinear(frozen_linear(), r=rank, lora_alpha=lora_alpha, lora_dropout=dropout)
        with torch.no_grad():
            layer.lora_A.weight.copy_(lora_A)
            layer.lora_B.weight.copy_(lora_B)
    elif implementation in ("hf_dora", "hf_lora"):
        from peft import LoraConfig, get_peft_model

        class OneLinear(nn.Module):
            def __init__(self, proj):
                super().__init__()
                self.proj = proj

            def forward(self, x):
                return self.proj(x)

        config = LoraConfig(
            r=rank,
            lora_alpha=lora_alpha,
            lora_dropout=dropout,
            target_modules=["proj"],
            use_dora=implementation == "hf_dora",
            bias="none",
        )
        layer = get_peft_model(OneLinear(frozen_linear()), config).base_model.model.proj
        with torch.no_grad():
            layer.lora_A["default"].weight.copy_(lora_A)
            layer.lora_B["default"].weight.copy_(lora_B)
            if implementation == "hf_dora":
                layer.lora_magnitude_vector["default"].weight.copy_(magnitude)
    elif implementation == "original_dora":
        layer = make_original_dora_class()(weight.clone(), rank, lora_alpha, dropout, dora_simple=True)
        with torch.no_grad():
            layer.lora_A.weight.copy_(lora_A)
            layer.lora_B.weight.copy_(lora_B)
            layer.weight_m_wdecomp.weight.copy_(magnitude.view(-1, 1))
    else:
        raise ValueError(f"unknown implementation {implementation!r}")
    trainable = [p for p in layer.parameters() if p.requires_grad]
    return layer, trainable, before_iteration


def layer_worker(args) -> None:
    select_peft(args.impl)
    import torch

    torch.manual_seed(args.seed)
    if args.device == "cpu":
        torch.set_num_threads(args.threads or os.cpu_count())
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    lora_alpha = 2 * args.rank
    weight, lora_A, lora_B, magnitude, x_cpu, dy_cpu = make_shared_weights(
        args.in_features, args.out_features, args.rank, lora_alpha, args.tokens, args.seed
    )
    device = torch.device(args.device)
    weight = weight.to(device, dtype)
    lora_A, lora_B, magnitude = lora_A.to(device), lora_B.to(device), magnitude.to(device)
    x = x_cpu.to(device, dtype)
    dy = dy_cpu.to(device, dtype)
    peft_origin = check_peft_origin(args.impl) if args.impl != "original_dora" and args.impl != "frozen_linear" else ""
    layer, trainable, before_iteration = build_layer(
        args.impl, weight, lora_A, lora_B, magnitude, args.rank, lora_alpha, args.dropout
    )

    if args.mode == "train":
        layer.train()
        x.requires_grad_(True)

        def run_iteration():
            before_iteration()
            for p in trainable:
                p.grad = None
            x.grad = None
            y = layer(x)
            (y * dy).sum().backward()

    else:
        layer.eval()

        def run_iteration():
            before_iteration()
            with torch.no_grad():
                layer(x)

    for _ in range(args.warmup):
        run_iteration()
    synchronize(args.device)
    peak_bytes = measure_peak_bytes(run_iteration, args.device)

    if args.probe_out:  # eval output on the first rows, for the cross-implementation check
        layer.eval()
        with torch.no_grad():
            torch.save(layer(x[:PROBE_TOKENS].detach()).float().cpu(), args.probe_out)
        layer.train(args.mode == "train")

    worker_serve(run_iteration, args.device, {"ready": args.impl, "peak_bytes": peak_bytes, "peft": peft_origin})


# ============================================================================================
# Parent: run the grid, print tables, write JSON
# ============================================================================================
def worker_argv(args, implementation, shape, rank, mode, dropout, probe_out):
    argv = [
        sys.executable, str(Path(__file__).resolve()), "--worker", "--impl", implementation,
        "--in-features", str(shape[0]), "--out-features", str(shape[1]), "--rank", str(rank),
        "--tokens", str(args.tokens), "--mode", mode, "--dropout", str(dropout), "--device", args.device,
        "--dtype", args.dtype, "--seed", str(args.seed), "--warmup", str(args.warmup),
    ]  # fmt: skip
    if args.threads:
        argv += ["--threads", str(args.threads)]
    if probe_out:
        argv += ["--probe-out", probe_out]
    return argv


def max_abs_diff(path_a: str, path_b: str) -> float:
    import torch

    return (torch.load(path_a) - torch.load(path_b)).abs().max().item()


def ratio(numerator, denominator):
    return numerator / denominator if numerator is not None and denominator else None


def measure_configuration(args, shape, rank, mode, dropout, probe_dir) -> dict:
    """All implementations of one (shape, rank, mode, dropout), interleaved."""
    probes = {}
    workers = []
    try:
        for implementation in args.impls:
            probe = None
            if mode == "eval" and implementation != "frozen_linear":
                probe = os.path.join(probe_dir, f"{implementation}.pt")
                probes[implementation] = probe
            argv = worker_argv(args, implementation, shape, rank, mode, dropout, probe)
            workers.append(Worker(implementation, argv))
        for worker in workers:  # started together; setup and warm-up are not timed
            worker.wait_ready()
        seconds = run_interleaved(workers, args.repeats)
    finally:
        for worker in workers:
            worker.close()
    entry = {
        "in_features": shape[0], "out_features": shape[1], "rank": rank, "tokens": args.tokens,
        "mode": mode, "dropout": dropout, "implementations": {},
    }  # fmt: skip
    for worker in workers:
        entry["implementations"][worker.name] = {
            "median_ms": 1e3 * statistics.median(seconds[worker.name]),
            "all_ms": [1e3 * s for s in seconds[worker.name]],
            "peak_mib": worker.ready_info["peak_bytes"] / 2**20,
            "peft": worker.ready_info["peft"],
            "kernel_path": worker.kernel_path,
        }
    numerics = {}
    for a, b in (("ours_dora", "hf_dora"), ("ours_dora", "original_dora"), ("ours_lora", "hf_lora")):
        if a in probes and b in probes:
            numerics[f"{a}_vs_{b}"] = max_abs_diff(probes[a], probes[b])
    entry["eval_max_abs_diff"] = numerics
    impl = entry["implementations"]

    def get(name, key):
        return impl.get(name, {}).get(key)

    entry["ratios"] = {
        f"{label}_{key}": ratio(get(a, key), get(b, key))
        for label, a, b in (
            ("ours_dora/ours_lora", "ours_dora", "ours_lora"),
            ("ours_dora/hf_dora", "ours_dora", "hf_dora"),
            ("ours_lora/hf_lora", "ours_lora", "hf_lora"),
            ("ours_dora/original", "ours_dora", "original_dora"),
        )
        for key in ("median_ms", "peak_mib")
    }
    return entry


def format_configuration(entry) -> str:
    head = (
        f"in={entry['in_features']} out={entry['out_features']} r={entry['rank']} tokens={entry['tokens']} "
        f"mode={entry['mode']} dropout={entry['dropout']}"
    )
    lines = [head, f"  {'implementation':<15}{'median ms':>11}{'peak MiB':>11}"]
    for name, result in entry["implementations"].items():
        lines.append(f"  {name:<15}{result['median_ms']:>11.2f}{result['peak_mib']:>11.1f}")
    lines.append(f"  {'ratio':<24}{'time':>8}{'memory':>8}")
    for label in ("ours_dora/ours_lora", "ours_dora/hf_dora", "ours_lora/hf_lora", "ours_dora/original"):
        t, m = entry["ratios"][f"{label}_median_ms"], entry["ratios"][f"{label}_peak_mib"]
        if t is not None:
            lines.append(f"  {label:<24}{t:>8.3f}{m:>8.3f}")
    for label, value in entry["eval_max_abs_diff"].items():
        lines.append(f"  eval max|diff| {label}: {value:.3e}")
    return "\n".join(lines)


def summary_table(entries) -> str:
    """One line per configuration: the four ratios (time, memory)."""
    lines = [
        f"{'shape':<11}{'r':>4} {'mode':<12}"
        f"{'DoRA/LoRA t':>12}{'m':>7}{'DoRA/HF t':>11}{'m':>7}{'LoRA/HFL t':>12}{'m':>7}{'DoRA/orig t':>12}{'m':>7}"
    ]
    for e in entries:
        mode = f"{e['mode']} p={e['dropout']}" if e["mode"] == "train" else "eval"
        cells = []
        for label in ("ours_dora/ours_lora", "ours_dora/hf_dora", "ours_lora/hf_lora", "ours_dora/original"):
            for key in ("median_ms", "peak_mib"):
                value = e["ratios"][f"{label}_{key}"]
                cells.append("-" if value is None else f"{value:.2f}")
        lines.append(
            f"{e['in_features']}x{e['out_features']:<6}{e['rank']:>4} {mode:<12}"
            f"{cells[0]:>12}{cells[1]:>7}{cells[2]:>11}{cells[3]:>7}{cells[4]:>12}{cells[5]:>7}{cells[6]:>12}{cells[7]:>7}"
        )
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"], help="default fp32 cpu, bf16 cuda")
    parser.add_argument("--quick", action="store_true", help="512x512, r=8, 256 tokens, 3 rounds (smoke test)")
    parser.add_argument("--impls", nargs="+", default=IMPLEMENTATIONS, choices=IMPLEMENTATIONS)
    parser.add_argument("--shapes", nargs="+", default=None, help="in x out, e.g. 2048x5504")
    parser.add_argument("--ranks", nargs="+", type=int, default=None)
    parser.add_argument("--modes", nargs="+", default=None, help="train:0, train:0.05, eval:0")
    parser.add_argument("--tokens", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (one iteration each)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch threads per worker (default: all cores)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/dora_layer_<device>.json)")
    # worker-only arguments
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--impl", help=argparse.SUPPRESS)
    parser.add_argument("--in-features", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out-features", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--rank", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--dropout", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--probe-out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.dtype is None:
        args.dtype = "bf16" if args.device == "cuda" else "fp32"
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        layer_worker(args)
        return
    if args.quick:
        shapes, ranks, default_tokens, default_repeats = QUICK_SHAPES, QUICK_RANKS, QUICK_TOKENS, 3
    elif args.device == "cuda":
        shapes, ranks, default_tokens, default_repeats = GPU_SHAPES, GPU_RANKS, GPU_TOKENS, 20
    else:
        shapes, ranks, default_tokens, default_repeats = CPU_SHAPES, CPU_RANKS, CPU_TOKENS, 7
    if args.shapes:
        shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes]
    ranks = args.ranks or ranks
    args.tokens = args.tokens or default_tokens
    args.repeats = args.repeats or default_repeats
    modes = MODES
    if args.modes:
        modes = [(m.split(":")[0], float(m.split(":")[1]) if ":" in m else 0.0) for m in args.modes]
    out_path = Path(args.out or DEFAULT_RESULTS_DIR / f"dora_layer_{args.device}.json")

    entries = []
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    with tempfile.TemporaryDirectory(prefix="dora_layer_probe_") as probe_dir:
        for shape in shapes:
            for rank in ranks:
                for mode, dropout in modes:
                    entry = measure_configuration(args, shape, rank, mode, dropout, probe_dir)
                    entries.append(entry)
                    print(format_configuration(entry), flush=True)
                    print(flush=True)
    print("Ratios (t = median time, m = peak memory); ours_dora is dora_simple=True")
    print(summary_table(entries))
    result = {
        "benchmark": "dora_layer",
        "started": started,
        "device": args.device,
        "dtype": args.dtype,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "order": "interleaved: each round times every implementation once, rotating order; medians",
        "memory_method": "cuda max_memory_allocated delta" if args.device == "cuda" else "TorchDispatchMode live-storage bytes",
        "machine": machine_info(),
        "configurations": entries,
    }
    write_result(out_path, result)


if __name__ == "__main__":
    main()
