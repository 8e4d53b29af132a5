"""Tiny random HF models (no downloads) for the conversion tests."""
from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 200  # not a multiple of 128: exercises vocab padding


def hf_config(family: str, vocab: int = VOCAB):
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
                  bos_token_id=1, eos_token_id=2, torch_dtype="float32",
                  initializer_range=0.1)  # O(1) logits: mapping errors cannot hide
    if family == "qwen3":  # head_dim 32 != hidden/heads, qk-norm, untied
        return Qwen3Config(**common, head_dim=32, rope_theta=1_000_000.0, max_position_embeddings=4096,
                           tie_word_embeddings=False, architectures=["Qwen3ForCausalLM"])
    if family == "llama":  # Llama-3.1 style: GQA, llama3 rope scaling, theta 5e5
        return LlamaConfig(**common, head_dim=16, rope_theta=500_000.0, max_position_embeddings=131072,
                           rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                           tie_word_embeddings=False, architectures=["LlamaForCausalLM"])
    if family == "qwen2":  # Qwen2.5-1.5B style: qkv bias, tied embeddings
        return Qwen2Config(**common, rope_theta=1_000_000.0, max_position_embeddings=4096,
                           tie_word_embeddings=True, architectures=["Qwen2ForCausalLM"])
    raise ValueError(family)


def make_hf_model(family: str, path: Path, *, seed: int = 0, vocab: int = VOCAB, **save_kwargs) -> Path:
    """save_pretrained a random model; norms and biases perturbed so bad mappings show."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(family, vocab), torch_dtype=torch.float32)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n or n.endswith("bias"):
                p.add_(0.2 * torch.randn_like(p))
    model.save_pretrained(path, **save_kwargs)
    GenerationConfig(bos_token_id=1, eos_token_id=2, do_sample=True, temperature=0.7).save_pretrained(path)
    (path / "tokenizer_config.json").write_text('{"model_max_length": 4096}')
    return path


def token_batch(seed: int = 0, batch: int = 2, seq: int = 32) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))
