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
