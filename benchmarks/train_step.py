r"""Tokens/s and peak memory of a full training step: our DoRA vs our LoRA vs HF peft DoRA.

One step = forward + backward + ``AdamW.step()`` on a causal LM with adapters on
q_proj, k_proj, v_proj, up_proj, down_proj (r=16, lora_alpha=32), at lora_dropout 0.05
and 0.

* CPU (default): SmolLM2-135M (``commonsense.models.load_base_model("smollm2-135m")``), fp32,
  batch 4 x seq 256 (``--quick``: 2 x 64).
* CUDA (``--device cuda``): a LLaMA-7B-shaped stack (hidden 4096, intermediate 11008,
  32 heads, vocab 32000) with ``--layers`` (default 4) decoder layers, random init, bf16.

Each (implementation, dropout) runs in its own child process (both this repo's fork and
HF peft import as ``peft``; see ``harness.py``). The workers of one dropout value stay
alive together and the parent times one step of each per round, rotating the order
(ABAB...); the reported step time is the median over rounds. Adapter weights A, B are set
identically in every implementation (seeded per module name); magnitudes start at ||W||.

Peak memory: as ``harness.py`` measures it (CUDA: max_memory_allocated delta; CPU: the
TorchDispatchMode live-storage counter), over one untimed step after warm-up, i.e. the
bytes allocated during a step above what already exists (weights, AdamW state).

Usage::

    python benchmarks/train_step.py --quick
    python benchmarks/train_step.py                       # SmolLM2-135M, CPU
    python benchmarks/train_step.py --device cuda         # 7B-shaped, 4 layers, bf16
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
import zlib
from pathlib import Path

import harness

IMPLEMENTATIONS = ["ours_dora", "ours_lora", "hf_dora", "hf_lora"]
DEFAULT_IMPLEMENTATIONS = ["ours_dora", "ours_lora", "hf_dora"]
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
DROPOUTS = [0.05, 0.0]


def build_base_model(args):
    import torch

    if args.device == "cpu":
        from commonsense.models import load_base_model

        return load_base_model(args.model, device="cpu", dtype="float32"), torch.float32
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=4096,
        intermediate_size=11008,
        num_attention_heads=32,
        num_key_value_heads=32,
        num_hidden_layers=args.layers,
        vocab_size=32000,
        max_position_embeddings=max(2048, args.seq),
    )
    torch.manual_seed(args.seed)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    return model, torch.bfloat16


def wrap_with_adapter(model, implementation, rank, dropout):
    """The peft model, and {module name: (lora_A weight, lora_B weight)} of its adapters."""
    common = dict(r=rank, lora_alpha=2 * rank, lora_dropout=dropout, target_modules=TARGET_MODULES)
    if implementation.startswith("ours"):
        from peft import DoraConfig, LoraConfig, get_peft_model

        config = DoraConfig(**common) if implementation == "ours_dora" else LoraConfig(**common)
        peft_model = get_peft_model(model, config)
        adapters = {
            name: (m.lora_A.weight, m.lora_B.weight)
            for name, m in peft_model.get_base_model().named_modules()
            if hasattr(m, "lora_A") and hasattr(m, "base_layer")
        }
    else:
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(**common, use_dora=implementation == "hf_dora", task_type="CAUSAL_LM")
        peft_model = get_peft_model(model, config)
        adapters = {
            name.replace("base_model.model.", "", 1): (m.lora_A["default"].weight, m.lora_B["default"].weight)
            for name, m in peft_model.named_modules()
            if hasattr(m, "lora_A") and hasattr(m, "lora_magnitude_vector")
        }
    return peft_model, adapters


def set_shared_adapter_weights(adapters, seed):
    """A, B from a generator seeded by the module name: identical in every implementation."""
    import math

    import torch

    with torch.no_grad():
        for name, (lora_A, lora_B) in adapters.items():
            generator = torch.Generator().manual_seed(seed + zlib.crc32(name.encode()))
            lora_A.copy_(torch.randn(lora_A.shape, generator=generator) / math.sqrt(lora_A.shape[1]))
            lora_B.copy_(torch.randn(lora_B.shape, generator=generator) * 0.01)


def step_worker(args) -> None:
    harness.select_peft(args.impl)
    import torch

    if args.device == "cpu" and args.threads:
        torch.set_num_threads(args.threads)
    peft_origin = harness.check_peft_origin(args.impl)
    model, dtype = build_base_model(args)
    peft_model, adapters = wrap_with_adapter(model, args.impl, args.rank, args.dropout)
    set_shared_adapter_weights(adapters, args.seed)
    peft_model.train()
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    vocab = peft_model.get_base_model().config.vocab_size
    generator = torch.Generator().manual_seed(args.seed)
    input_ids = torch.randint(0, vocab, (args.batch, args.seq), generator=generator).to(args.device)

    def run_step():
        optimizer.zero_grad(set_to_none=True)
        loss = peft_model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        optimizer.step()

    for _ in range(args.warmup):
        run_step()
    peak_bytes = harness.measure_peak_bytes(run_step, args.device)
    harness.worker_serve(
        run_step,
        args.device,
        {
            "ready": args.impl,
            "peak_bytes": peak_bytes,
            "peft": peft_origin,
            "adapted_modules": len(adapters),
            "trainable_params": sum(p.numel() for p in trainable),
        },
    )


def worker_argv(args, implementation, dropout):
    argv = [
        sys.executable, str(Path(__file__).resolve()), "--worker", "--impl", implementation,
        "--dropout", str(dropout), "--device", args.device, "--model", args.model, "--layers", str(args.layers),
        "--batch", str(args.batch), "--seq", str(args.seq), "--rank", str(args.rank),
        "--warmup", str(args.warmup), "--seed", str(args.seed),
    ]  # fmt: skip
    if args.threads:
        argv += ["--threads", str(args.threads)]
    return argv


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--quick", action="store_true", help="batch 2 x seq 64, 2 rounds (smoke test)")
    parser.add_argument("--impls", nargs="+", default=DEFAULT_IMPLEMENTATIONS, choices=IMPLEMENTATIONS)
    parser.add_argument("--dropouts", nargs="+", type=float, default=DROPOUTS)
    parser.add_argument("--model", default="smollm2-135m", help="CPU base model (alias, folder or hub id)")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers of the CUDA 7B-shaped stack")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--seq", type=int, default=None)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (one step per worker each)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/train_step_<device>.json)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--impl", help=argparse.SUPPRESS)
    parser.add_argument("--dropout", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.batch, args.seq = args.batch or 2, args.seq or 64
        args.repeats = args.repeats or 2
    else:
        args.batch = args.batch or (16 if args.device == "cuda" else 4)
        args.seq = args.seq or 256
        args.repeats = args.repeats or (10 if args.device == "cuda" else 3)
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        step_worker(args)
        return
    tokens_per_step = args.batch * args.seq
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    entries = []
    for dropout in args.dropouts:
        workers = []
        try:
            for implementation in args.impls:
                workers.append(harness.Worker(implementation, worker_argv(args, implementation, dropout)))
            for worker in workers:
                worker.wait_ready()
            seconds = harness.run_interleaved(workers, args.repeats)
        finally:
            for worker in workers:
                worker.close()
        entry = {"dropout": dropout, "implementations": {}}
        for worker in workers:
            median = statistics.median(seconds[worker.name])
            entry["implementations"][worker.name] = {
                "median_step_s": median,
                "all_step_s": seconds[worker.name],
                "tokens_per_s": tokens_per_step / median,
                "peak_mib": worker.ready_info["peak_bytes"] / 2**20,
                "adapted_modules": worker.ready_info["adapted_modules"],
                "trainable_params": worker.ready_info["trainable_params"],
                "peft": worker.ready_info["peft"],
                "kernel_path": worker.kernel_path,
            }
        entries.append(entry)
        impl = entry["implementations"]
        print(f"lora_dropout={dropout}  batch={args.batch} seq={args.seq} r={args.rank} device={args.device}")
        print(f"  {'implementation':<12}{'step s':>9}{'tokens/s':>10}{'peak MiB':>10}{'trainable':>11}")
        for name, r in impl.items():
            print(
                f"  {name:<12}{r['median_step_s']:>9.3f}{r['tokens_per_s']:>10.1f}{r['peak_mib']:>10.1f}"
                f"{r['trainable_params']:>11}"
            )
        ratios = {}
        for a, b in (("ours_dora", "ours_lora"), ("ours_dora", "hf_dora"), ("ours_lora", "hf_lora")):
            if a in impl and b in impl:
                ratios[f"{a}/{b}"] = {
                    "step_time": impl[a]["median_step_s"] / impl[b]["median_step_s"],
                    "peak_mib": impl[a]["peak_mib"] / impl[b]["peak_mib"],
                }
                print(
                    f"  {a}/{b}: step time x{ratios[f'{a}/{b}']['step_time']:.3f}, "
                    f"peak memory x{ratios[f'{a}/{b}']['peak_mib']:.3f}"
                )
        entry["ratios"] = ratios
        print(flush=True)
    result = {
        "benchmark": "train_step",
        "started": started,
        "device": args.device,
        "model": args.model if args.device == "cpu" else f"LLaMA-7B-shaped, {args.layers} layers, bf16, random init",
        "batch": args.batch,
        "seq": args.seq,
        "rank": args.rank,
        "target_modules": TARGET_MODULES,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "order": "interleaved: each round times one step of every implementation, rotating order; medians",
        "machine": harness.machine_info(),
        "results": entries,
    }
    out_path = Path(args.out or harness.DEFAULT_RESULTS_DIR / f"train_step_{args.device}.json")
    harness.write_result(out_path, result)


if __name__ == "__main__":
    main()
