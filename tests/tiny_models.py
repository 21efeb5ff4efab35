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


def save_char_llama(d, seed: int = 0):
    """A randomly initialised tiny Llama (hidden 32, MLP 64, 2 layers) with the toy's character tokenizer,
    saved as a Hugging Face directory ``d`` (what the learner and sharding tests load by path)."""
    from t2dist.toy.tokenizer import build_char_tokenizer

    tok = build_char_tokenizer()
    torch.manual_seed(seed)
    mcfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=64, initializer_range=0.3,
                       pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    LlamaForCausalLM(mcfg).save_pretrained(d)
    tok.save_pretrained(d)
    return d
