"""Tiny random LLaMA models for the fork's tests."""
import torch
from transformers import LlamaConfig, LlamaForCausalLM

LLAMA_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_tiny_llama(seed: int = 0, kv_heads: int = 2, vocab: int = 96) -> LlamaForCausalLM:
    """Two layers, GQA (k/v narrower than q, as in LLaMA-3), random weights."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


def randomize_adapter(model, g: torch.Generator):
    """Non-zero B and a magnitude away from ||W||, so the adapter changes the outputs."""
    with torch.no_grad():
        for layer in model.base_model.adapter_layers():
            if layer.r > 0:
                layer.lora_B.weight.normal_(0, 0.2, generator=g)
            if hasattr(layer, "weight_m_wdecomp"):
                m = layer.weight_m_wdecomp.weight
                m.mul_(1 + 0.2 * torch.randn(m.shape, generator=g))
    return model
