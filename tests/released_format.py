"""A released DoRA adapter folder, built by hand from the original fork's key spec.

Never written with our save_pretrained, so a change in what our loaders accept (evaluation,
download --check, merge_adapter.py) shows up as a test failure.
"""
import json
from pathlib import Path

import torch

SEED_TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


def layer_shapes(config) -> dict:
    """(out, in) of each LLaMA linear, from the model config alone."""
    hidden, mlp = config["hidden_size"], config["intermediate_size"]
    heads = config["num_attention_heads"]
    kv = (config.get("num_key_value_heads") or heads) * (config.get("head_dim") or hidden // heads)
    return {"q_proj": (hidden, hidden), "k_proj": (kv, hidden), "v_proj": (kv, hidden), "o_proj": (hidden, hidden),
            "gate_proj": (mlp, hidden), "up_proj": (mlp, hidden), "down_proj": (hidden, mlp)}


def write_released_adapter(folder: Path, config: dict, r: int, alpha: int, seed: int, targets=SEED_TARGETS,
                           base_model="yahma/llama-7b-hf") -> dict:
    """adapter_config.json + fp32 adapter_model.bin exactly as the original fork saved them."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(config["num_hidden_layers"]):
        for name, (out_f, in_f) in layer_shapes(config).items():
            if name not in targets:
                continue
            key = f"base_model.model.model.layers.{layer}.{'self_attn' if name in ATTENTION else 'mlp'}.{name}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(r, in_f, generator=g) / in_f ** 0.5
            tensors[f"{key}.lora_B.weight"] = torch.randn(out_f, r, generator=g) * 0.2
            tensors[f"{key}.weight_m_wdecomp.weight"] = 1.0 + torch.rand(out_f, 1, generator=g)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(tensors, folder / "adapter_model.bin")
    adapter_config = {  # the original DoraConfig's fields, as json.dumps(indent=2, sort_keys=True) wrote them
        "Wdecompose_target_modules": None, "base_model_name_or_path": base_model, "bias": "none",
        "dora_simple": True, "enable_lora": None, "fan_in_fan_out": False, "inference_mode": True,
        "lora_alpha": alpha, "lora_dropout": 0.05, "merge_weights": False, "modules_to_save": None,
        "peft_type": "DORA", "r": r, "target_modules": list(targets), "task_type": "CAUSAL_LM",
    }
    (folder / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2, sort_keys=True))
    return tensors


def merged_reference(W: torch.Tensor, tensors: dict, key: str, scaling: float) -> torch.Tensor:
    """The DoRA weight a released adapter defines, in float64: m * (W + s B A) / ||W + s B A|| (row norms)."""
    V = W.double() + scaling * tensors[f"{key}.lora_B.weight"].double() @ tensors[f"{key}.lora_A.weight"].double()
    return tensors[f"{key}.weight_m_wdecomp.weight"].double() * V / V.norm(dim=1, keepdim=True)
