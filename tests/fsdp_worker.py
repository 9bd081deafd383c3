"""One process of the FSDP check in tests/test_distributed.py (run by torchrun, gloo on CPU).

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/fsdp_worker.py fsdp1 SEED OUT_DIR

Every process builds the same DoRA model twice: a reference that stays whole (one process's
computation) and one sharded with FSDP1 (``FullyShardedDataParallel``, one unit per
``LlamaDecoderLayer``, ``use_orig_params=True``) or FSDP2 (``fully_shard``). The global batch is
split over the processes; each writes what it measured to OUT_DIR/rank<N>.json:

- the forward, the adapter gradients (gathered whole) and the adapter after one SGD step,
  against the reference on the whole batch; then a second forward after the step;
- a forward after new adapter values are loaded into the shards (the stale-norm case
  of peft/src/peft/tuners/sharding.py);
- the errors met when a DoRA layer is handed a sharded weight: its norm asked for outside
  forward, and a model whose adapted nn.Linear itself is wrapped.
"""
import json
import os
import sys
import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for path in (os.path.join(ROOT, "peft", "tests"), os.path.join(ROOT, "peft", "src"), ROOT):
    sys.path.insert(0, path)

from tiny_llama import make_tiny_llama  # noqa: E402

from peft import DoraConfig, get_peft_model  # noqa: E402
from peft.tuners.dora import DoraLinear  # noqa: E402
from peft.tuners.sharding import ShardedWeightError, set_norm_caching  # noqa: E402

ADAPTER_MARKERS = ("lora_A", "lora_B", "weight_m_wdecomp")
FSDP1_PREFIX = "_fsdp_wrapped_module."


def build_model(seed: int):
    """A tiny LLaMA with full DoRA on q,k,v,up,down and magnitude-only o_proj, adapter values
    moved off their initialisation (B != 0, m != ||W||) so every term of the norm matters."""
    config = DoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"],
                        Wdecompose_target_modules=["o_proj"], lora_dropout=0.0, task_type="CAUSAL_LM")
    model = get_peft_model(make_tiny_llama(seed=0), config)
    perturb_adapter(model, seed)
    return model


def perturb_adapter(model, seed: int) -> dict:
    """Random adapter values (the same on every process); returns them by parameter name."""
    generator = torch.Generator().manual_seed(seed)
    values = {}
    with torch.no_grad():
        for name, param in model.named_parameters():
            if any(marker in name for marker in ADAPTER_MARKERS):
                noise = torch.randn(param.shape, generator=generator)
                param.add_(noise * (0.1 if "lora_B" in name else 0.02))
                values[name] = param.detach().clone()
    return values


def token_loss_sum(logits, ids):
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")


def adapter_layers(model):
    return [m for m in model.modules() if isinstance(m, DoraLinear)]


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), (sorted(a)[:3], sorted(b)[:3])
    return max((a[k] - b[k]).abs().max().item() for k in a)


# ---- sharding and gathering, per FSDP version -----------------------------------------------
def shard(model, mode: str, wrap_linear: bool = False):
    from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    if mode == "fsdp1":
        # The DoRA layer finds out about FSDP1 by itself (sharding.is_fsdp_view).
        units = {torch.nn.Linear} if wrap_linear else {LlamaDecoderLayer}
        return FullyShardedDataParallel(model, auto_wrap_policy=ModuleWrapPolicy(units),
                                        device_id=torch.device("cpu"), use_orig_params=True)
    set_norm_caching(model, False)  # FSDP2's unsharded weights look ordinary: say so (sharding.py)
    blocks = model.base_model.model.model.layers
    for block in blocks:
        if wrap_linear:
            fully_shard(block.self_attn.q_proj.base_layer)
        fully_shard(block)
    fully_shard(model)
    return model


def full_adapter(sharded, inner, mode: str, grads: bool = False) -> dict:
    """The adapter's parameters (or their gradients), whole, by their unsharded names."""
    def pick(tensor):
        return tensor.grad if grads else tensor

    if mode == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel

        with FullyShardedDataParallel.summon_full_params(sharded, with_grads=grads):
            return {name.replace(FSDP1_PREFIX, ""): pick(p).detach().clone()
                    for name, p in inner.named_parameters() if p.requires_grad}
    return {name: pick(p).full_tensor().detach().clone() for name, p in inner.named_parameters() if p.requires_grad}


def load_into_shards(sharded, inner, values: dict, mode: str) -> None:
    """Write new adapter values into the sharded model, as a checkpoint reload would."""
    if mode == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel

        with FullyShardedDataParallel.summon_full_params(sharded, writeback=True), torch.no_grad():
            params = {name.replace(FSDP1_PREFIX, ""): p for name, p in inner.named_parameters()}
            for name, value in values.items():
                params[name].copy_(value)
        return
    from torch.distributed.tensor import distribute_tensor

    params = dict(inner.named_parameters())
    with torch.no_grad():
        for name, value in values.items():
            param = params[name]
            param.copy_(distribute_tensor(value, param.device_mesh, param.placements))


def mixed_precision_run(seed: int, rows, keep_fp32: bool) -> dict:
    """FSDP1 with bf16 mixed precision: the dtype m has inside forward, the largest relative
    error of the m the forward applied (g * n) against the fp32 master m, and whether backward
    reaches m."""
    from torch.distributed.fsdp import FullyShardedDataParallel, MixedPrecision
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from peft.tuners.dora import DoraMagnitude
    from peft.tuners.sharding import keep_magnitude_fp32

    config = DoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], Wdecompose_target_modules=["o_proj"],
                        task_type="CAUSAL_LM")
    model = get_peft_model(make_tiny_llama(seed=seed % 1000), config)
    seen = {"m_dtypes": set(), "max_m_error": 0.0}
    master = {}  # the fp32 magnitudes, by module

    def record(module, args, output):
        seen["m_dtypes"].add(str(module.weight.dtype))
        applied = output[0].double() * args[0].double()  # g * n: the m this forward used
        error = ((applied - master[module]) / master[module]).abs().max().item()
        seen["max_m_error"] = max(seen["max_m_error"], error)

    for module in model.modules():
        if isinstance(module, DoraMagnitude):
            master[module] = module.weight.detach().view(-1).double().clone()
            module.register_forward_hook(record)
    policy = MixedPrecision(param_dtype=torch.bfloat16, reduce_dtype=torch.bfloat16, buffer_dtype=torch.bfloat16)
    if keep_fp32:
        keep_magnitude_fp32(policy)
    sharded = FullyShardedDataParallel(model, auto_wrap_policy=ModuleWrapPolicy({LlamaDecoderLayer}),
                                       device_id=torch.device("cpu"), use_orig_params=True, mixed_precision=policy)
    logits = sharded(input_ids=rows).logits
    token_loss_sum(logits.float(), rows).backward()
    with FullyShardedDataParallel.summon_full_params(sharded, with_grads=True):
        magnitude_grads = [p.grad for n, p in sharded.named_parameters() if "weight_m_wdecomp" in n]
        grads_ok = bool(magnitude_grads) and all(g is not None and torch.isfinite(g).all().item()
                                                  and g.abs().sum().item() > 0 for g in magnitude_grads)
    return {"m_dtypes": sorted(seen["m_dtypes"]), "max_m_error": seen["max_m_error"],
            "logits_dtype": str(logits.dtype), "magnitude_grads_ok": grads_ok}


def sharded_weight_error(action) -> str:
    try:
        action()
    except ShardedWeightError as err:
        return str(err)
    return ""


# ---- the check ------------------------------------------------------------------------------
def main() -> None:
    mode, seed, out_dir = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    warnings.filterwarnings("ignore")  # FSDP1's deprecation and mixed-requires_grad notes
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(seed)
    results = {"rank": rank, "world": world}

    reference = build_model(seed)
    inner = build_model(seed)
    sharded = shard(inner, mode)

    # A global batch of 4 sequences; each process takes its rows. The loss is the sum over all
    # tokens / their count; FSDP averages gradients over processes, hence the factor `world`.
    ids = torch.randint(3, 90, (4, 12), generator=torch.Generator().manual_seed(seed + 1))
    rows = ids.chunk(world)[rank]
    tokens = ids[:, 1:].numel()
    ref_logits = reference(input_ids=ids).logits
    (token_loss_sum(ref_logits, ids) / tokens).backward()
    logits = sharded(input_ids=rows).logits
    (token_loss_sum(logits, rows) / tokens * world).backward()
    results["forward"] = (logits - ref_logits.chunk(world)[rank]).abs().max().item()

    ref_grads = {n: p.grad.clone() for n, p in reference.named_parameters() if p.requires_grad}
    results["grads"] = max_diff(full_adapter(sharded, inner, mode, grads=True), ref_grads)
    results["grad_scale"] = max(g.abs().max().item() for g in ref_grads.values())

    lr = 0.5  # SGD: the update is lr * gradient, so a wrong gradient shows in the step (Adam's first step would not)
    for model in (reference, sharded):
        torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr).step()
    ref_params = {n: p.detach().clone() for n, p in reference.named_parameters() if p.requires_grad}
    results["step"] = max_diff(full_adapter(sharded, inner, mode), ref_params)

    with torch.no_grad():  # after the step: the norms must be recomputed from the new A, B
        results["forward_after_step"] = (
            sharded(input_ids=rows).logits - reference(input_ids=ids).logits.chunk(world)[rank]
        ).abs().max().item()
        sharded.eval(), reference.eval()
        sharded(input_ids=rows)  # an evaluation pass, as before a best-checkpoint reload
        new_values = perturb_adapter(reference, seed + 2)
        load_into_shards(sharded, inner, new_values, mode)
        results["forward_after_load"] = (
            sharded(input_ids=rows).logits - reference(input_ids=ids).logits.chunk(world)[rank]
        ).abs().max().item()

    # Outside forward the weights are shards: asking a DoRA layer for its norm is refused.
    layer = adapter_layers(inner)[0]
    results["norm_outside_forward_error"] = sharded_weight_error(layer.weight_sq_norm)
    # An adapted nn.Linear wrapped on its own is never unsharded around the DoRA code.
    wrapped_alone = shard(build_model(seed), mode, wrap_linear=True)
    results["linear_wrapped_alone_error"] = sharded_weight_error(lambda: wrapped_alone(input_ids=rows))

    if mode == "fsdp1":
        results["mixed_precision"] = {
            "fixed": mixed_precision_run(seed, rows, keep_fp32=True),
            "unfixed": mixed_precision_run(seed, rows, keep_fp32=False),
        }

    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as handle:
        json.dump(results, handle, indent=2)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
