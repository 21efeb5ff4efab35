"""Randomly initialised tiny Hugging Face causal LMs of several architectures (no downloads)."""
import torch
from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM)

ARCHS = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
}


def tiny_model(arch: str = "llama", seed: int = 0, dtype=torch.float32, layers: int = 2):
    cfg_cls, model_cls = ARCHS[arch]
    torch.manual_seed(seed)
    cfg = cfg_cls(hidden_size=48, intermediate_size=96, num_hidden_layers=layers, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=97, max_position_embeddings=64)
    return model_cls(cfg).to(dtype).eval()
