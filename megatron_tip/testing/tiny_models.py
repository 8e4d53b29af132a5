"""Tiny random HF teacher/student pairs for tests and smoke runs (built from configs, no downloads)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch


def make_tiny_hf_model(out_dir: str | Path, *, tokenizer_dir: str | Path, family: str = "llama",
                       hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                       ffn: int = 128, seed: int = 0, tie: bool = False,
                       vocab_size: Optional[int] = None, prompt_template: Optional[str] = None,
                       max_positions: int = 512) -> Path:
    """Save a random ``family`` (llama | qwen2 | qwen3) causal LM + the given tokenizer to ``out_dir``."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    cfg_cls, model_cls = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM),
                          "qwen3": (Qwen3Config, Qwen3ForCausalLM)}[family]
    cfg = cfg_cls(vocab_size=vocab_size or len(tok), hidden_size=hidden, intermediate_size=ffn,
                  num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                  max_position_embeddings=max_positions, tie_word_embeddings=tie, rms_norm_eps=1e-6,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                  pad_token_id=tok.pad_token_id, head_dim=hidden // heads, torch_dtype="float32")
    torch.manual_seed(seed)
    model = model_cls(cfg)
    out = Path(out_dir)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    if prompt_template is not None:
        (out / "prompt_template.txt").write_text(prompt_template)
    return out


def write_prompts(path: str | Path, rows: list[dict]) -> Path:
    p = Path(path)
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p
