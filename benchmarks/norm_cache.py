"""What DoRA's norm caches save: one adapted layer, the caches on and off, side by side.

A DoRA layer needs n = ||W + s B A|| per output row before every forward. ``DoraLinear``
caches ||W||^2 (W is frozen) and n (until A, B or W change, or an optimizer steps). This
script times one layer in three cache modes, interleaved round by round in one process
(ABCABC..., medians), so drifts of a shared machine hit all three alike:

    on      both caches (the forward finds n and ||W||^2 computed)
    no_n    ||W||^2 cached, n recomputed every forward (what every first micro-batch after
            an optimizer step pays with the caches on)
    off     nothing cached (``cache_norms=False``, as under FSDP)

Scenarios, per layer shape:

    train    forward + backward of one micro-batch (lora_dropout 0.05, as the recipe)
    prefill  an evaluation forward under no_grad (a batch of prompts)
    decode   an evaluation forward of a few tokens (one generation step for a small batch)

and the norms alone (``norm_n``: n with ||W||^2 cached; ``norm_w2``: ||W||^2). A training
step of k micro-batches costs, per mode: on = no_n + (k - 1) on; no_n = k no_n; off = k off.
The table prints these for k = 1 (the 7B recipe: micro-batch 16 = batch 16) and k = 4 (the
SmolLM2 reproduction: micro-batch 4), and the eval ratios no_n / on and off / on.

Shapes: SmolLM2-135M's adapted layers (q 576x576, k and v 576x192, up 576x1536, down
1536x576) and LLaMA-7B's (q 4096x4096 -- k and v are the same --, up 4096x11008, down
11008x4096), in x out. Only the layers themselves are timed: a whole model step adds the
frozen attention, MLP and lm_head, so what the cache saves of a real step is less still.

    python benchmarks/norm_cache.py --quick     # tiny shapes, seconds: a smoke test
    python benchmarks/norm_cache.py             # SmolLM2 and 7B shapes, CPU fp32, a few minutes
    python benchmarks/norm_cache.py --base nf4 --models smollm2-135m   # QDoRA (bitsandbytes 4-bit)
    python benchmarks/norm_cache.py --device cuda --dtype bf16 --train-tokens 4096

Writes ``benchmarks/results/norm_cache_<device>.json`` (``--out`` to change).
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "peft" / "src"))  # this repo's fork, not a pip-installed peft

from peft.tuners.dora import DoraLinear  # noqa: E402

import harness  # noqa: E402  (benchmarks/, this script's folder)

MODES = ("on", "no_n", "off")
SHAPES = {  # model -> [(layer, in, out)]
    "smollm2-135m": [("q_proj", 576, 576), ("k_proj/v_proj", 576, 192), ("up_proj", 576, 1536),
                     ("down_proj", 1536, 576)],
    "llama-7b": [("q/k/v_proj", 4096, 4096), ("up_proj", 4096, 11008), ("down_proj", 11008, 4096)],
    "quick": [("tiny", 256, 384)],
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def make_layer(in_f: int, out_f: int, rank: int, device: str, dtype: torch.dtype, base_kind: str) -> DoraLinear:
    base = nn.Linear(in_f, out_f, bias=False, device=device, dtype=dtype)
    base.weight.requires_grad_(False)
    if base_kind == "nf4":  # QDoRA: the norms read the dequantized weight
        import bitsandbytes as bnb

        dense = base
        base = bnb.nn.Linear4bit(in_f, out_f, bias=False, compute_dtype=dtype, quant_type="nf4")
        base.load_state_dict(dense.state_dict())
        base = base.to(device)
    layer = DoraLinear(base, r=rank, lora_alpha=2 * rank, lora_dropout=0.05)
    with torch.no_grad():  # a trained-looking adapter: B away from zero
        layer.lora_B.weight.normal_(0, 0.02)
    return layer


def set_mode(layer: DoraLinear, mode: str) -> None:
    """Switch the caches for ``mode`` and fill what it keeps, so the timed run finds it."""
    layer.cache_norms = mode != "off"
    layer.invalidate_norm_cache()
    with torch.no_grad():
        if mode == "on":
            layer.direction_norm()
        elif mode == "no_n":
            layer.weight_sq_norm()


def before_forward(layer: DoraLinear, mode: str) -> None:
    if mode == "no_n":
        layer._norm_cache = None  # the cached n only; ||W||^2 stays (see the module docstring)


def timed(device: str, fn) -> float:
    harness.synchronize(device)
    start = time.perf_counter()
    fn()
    harness.synchronize(device)
    return (time.perf_counter() - start) * 1e3


def scenario_runs(layer: DoraLinear, in_f: int, out_f: int, tokens: dict, device: str, dtype: torch.dtype) -> dict:
    """name -> fn(mode) running one timed iteration of that scenario."""
    gen = torch.Generator().manual_seed(0)
    inputs = {name: torch.randn(t, in_f, generator=gen).to(device, dtype) for name, t in tokens.items()}
    dy = torch.randn(tokens["train"], out_f, generator=gen).to(device, dtype)
    params = [p for p in layer.parameters() if p.requires_grad]

    def train(mode):
        layer.train()
        for p in params:
            p.grad = None
        before_forward(layer, mode)
        layer(inputs["train"]).backward(dy)

    def evaluate(name):
        def run(mode):
            layer.eval()
            before_forward(layer, mode)
            with torch.no_grad():
                layer(inputs[name])

        return run

    def norm_n(mode):
        before_forward(layer, "no_n")
        with torch.no_grad():
            layer.direction_norm()

    def norm_w2(mode):
        layer._weight_sq_norm_cache = None
        layer.weight_sq_norm()

    return {"train": train, "prefill": evaluate("prefill"), "decode": evaluate("decode"),
            "norm_n": norm_n, "norm_w2": norm_w2}


def measure_shape(in_f, out_f, args, dtype) -> dict:
    torch.manual_seed(0)
    layer = make_layer(in_f, out_f, args.rank, args.device, dtype, args.base)
    tokens = {"train": args.train_tokens, "prefill": args.prefill_tokens, "decode": args.decode_tokens}
    runs = scenario_runs(layer, in_f, out_f, tokens, args.device, dtype)
    times = {name: {mode: [] for mode in MODES} for name in runs}
    for round_index in range(args.warmup + args.repeats):
        for name, run in runs.items():
            modes = MODES if not name.startswith("norm_") else ("on",)  # the norms alone: one mode
            rotation = round_index % len(modes)
            for mode in modes[rotation:] + modes[:rotation]:  # rotating order
                set_mode(layer, mode)
                elapsed = timed(args.device, lambda: run(mode))
                if round_index >= args.warmup:
                    times[name][mode].append(elapsed)
    medians = {name: {mode: statistics.median(v) for mode, v in by_mode.items() if v}
               for name, by_mode in times.items()}
    return {"in": in_f, "out": out_f, "tokens": tokens, "median_ms": medians, "ms": times}


def step_ms(train: dict, k: int) -> dict:
    """Milliseconds of a training step of k micro-batches, per cache mode (module docstring)."""
    return {"on": train["no_n"] + (k - 1) * train["on"], "no_n": k * train["no_n"], "off": k * train["off"]}


def report(results: list) -> None:
    header = (f"{'model':13} {'layer':14} {'shape':>11} {'norm_n':>8} {'norm_w2':>8} {'train on':>9} "
              f"{'step k=1 no_n/on off/on':>24} {'step k=4 no_n/on off/on':>24} "
              f"{'prefill no_n/on off/on':>23} {'decode on ms':>13} {'no_n/on off/on':>15}")
    print(header)
    for r in results:
        m = r["median_ms"]
        cells = []
        for k in (1, 4):
            step = step_ms(m["train"], k)
            cells.append(f"{step['no_n'] / step['on']:12.3f} {step['off'] / step['on']:11.3f}")
        pre, dec = m["prefill"], m["decode"]
        print(f"{r['model']:13} {r['layer']:14} {r['in']:>5}x{r['out']:<5} {m['norm_n']['on']:8.2f} "
              f"{m['norm_w2']['on']:8.2f} {m['train']['on']:9.2f} {cells[0]:>24} {cells[1]:>24} "
              f"{pre['no_n'] / pre['on']:11.3f} {pre['off'] / pre['on']:11.3f} {dec['on']:13.3f} "
              f"{dec['no_n'] / dec['on']:7.2f} {dec['off'] / dec['on']:7.2f}")
    print("ms are medians; ratios > 1 are what the cache saves (no_n: n recomputed; off: n and ||W||^2).")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one tiny shape, 2 rounds: a smoke test")
    parser.add_argument("--models", nargs="+", choices=["smollm2-135m", "llama-7b"], default=["smollm2-135m", "llama-7b"])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--base", choices=["float", "nf4"], default="float",
                        help="nf4: a bitsandbytes 4-bit base layer (QDoRA), whose norms dequantize W")
    parser.add_argument("--rank", type=int, default=32, help="the recipe's DoRA r (default 32)")
    parser.add_argument("--train-tokens", type=int, default=1024, help="tokens per micro-batch (default 4 x 256)")
    parser.add_argument("--train-tokens-7b", type=int, default=512,
                        help="for the 7B shapes on a CPU (the recipe's GPU micro-batch is 16 x 256 = 4096)")
    parser.add_argument("--prefill-tokens", type=int, default=2048, help="an eval batch of prompts (default 8 x 256)")
    parser.add_argument("--decode-tokens", type=int, default=8, help="one generation step of a batch of 8")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads (default 1: on a shared machine more threads than free cores spin and "
                             "scatter the timings)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    for name in ("threads", "rank", "train_tokens", "train_tokens_7b", "prefill_tokens", "decode_tokens", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.warmup < 0:
        parser.error(f"--warmup must be at least 0, got {args.warmup}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if args.quick:
        args.models, args.repeats, args.warmup = ["quick"], 2, 1
        args.train_tokens = args.prefill_tokens = 128
    return args


def git_commit() -> str:
    """The measured code's commit (with "+changes" when the checkout differs from it)."""
    def git(*args):
        return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True).stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    return commit + ("+changes" if git("status", "--porcelain", "--untracked-files=no") else "")


def main(argv=None) -> None:
    args = parse_args(argv)
    dtype = DTYPES[args.dtype]
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    suffix = "" if args.base == "float" else f"_{args.base}"
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"norm_cache_{args.device}{suffix}.json"
    results = []
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    load_before = os.getloadavg()
    for model in args.models:
        for layer_name, in_f, out_f in SHAPES[model]:
            shape_args = argparse.Namespace(**vars(args))
            if model == "llama-7b" and args.device == "cpu":
                shape_args.train_tokens = shape_args.prefill_tokens = args.train_tokens_7b
            result = measure_shape(in_f, out_f, shape_args, dtype)
            result.update(model=model, layer=layer_name)
            results.append(result)
            print(f"measured {model} {layer_name} {in_f}x{out_f}", flush=True)
    report(results)
    record = {
        "benchmark": "norm_cache", "started": started, "commit": git_commit(), "command": " ".join(sys.argv),
        "device": args.device, "dtype": args.dtype,
        "base": args.base, "rank": args.rank, "repeats": args.repeats, "warmup": args.warmup, "modes": list(MODES),
        "machine": {**harness.machine_info(), "threads": torch.get_num_threads(),
                    "load_average_before": load_before, "load_average_after": os.getloadavg()},
        "results": results,
    }
    harness.write_result(out, record)


if __name__ == "__main__":
    main()
