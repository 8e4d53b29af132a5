"""Published shapes of the models the paper pairs use, as their HF ``config.json`` states them.

Each entry copies the architecture keys of the model's ``config.json`` on the Hugging Face hub
(the repository named in ``source``); they go through the same reader as a real checkpoint
(``spec_from_hf_config``), so a named shape and a downloaded config give the same ModelSpec.
``published_params`` is the total the model card states (embeddings included, counted once when
tied); the unit tests check the ModelSpec count against it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from megatron_tip.models.spec import ModelSpec


@dataclass(frozen=True)
class Shape:
    name: str
    source: str  # Hugging Face repository whose config.json the numbers come from
    published_params: float  # model card total (e.g. 8.2e9)
    config: dict[str, Any]

    def spec(self) -> ModelSpec:
        from megatron_tip.models.hf.families import spec_from_hf_config

        return spec_from_hf_config(self.config)


def _qwen3(hidden, ffn, layers, heads, kv, tied):
    return {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": hidden,
            "intermediate_size": ffn, "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": kv, "head_dim": 128, "vocab_size": 151936,
            "max_position_embeddings": 40960, "rope_theta": 1000000, "rms_norm_eps": 1e-06,
            "tie_word_embeddings": tied, "hidden_act": "silu", "attention_bias": False}


def _qwen2(hidden, ffn, layers, heads, kv, vocab, tied, max_pos, eps):
    return {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": hidden,
            "intermediate_size": ffn, "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": kv, "vocab_size": vocab, "max_position_embeddings": max_pos,
            "rope_theta": 1000000.0, "rms_norm_eps": eps, "tie_word_embeddings": tied,
            "hidden_act": "silu", "use_sliding_window": False}


def _llama(hidden, ffn, layers, heads, kv):
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
            "intermediate_size": ffn, "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": kv, "vocab_size": 128256, "max_position_embeddings": 131072,
            "rope_theta": 500000.0, "rms_norm_eps": 1e-05, "tie_word_embeddings": False,
            "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "pretraining_tp": 1,
            "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 8192, "rope_type": "llama3"}}


SHAPES: dict[str, Shape] = {s.name: s for s in (
    Shape("qwen3-1.7b", "Qwen/Qwen3-1.7B", 1.7e9, _qwen3(2048, 6144, 28, 16, 8, True)),
    Shape("qwen3-4b", "Qwen/Qwen3-4B", 4.0e9, _qwen3(2560, 9728, 36, 32, 8, True)),
    Shape("qwen3-8b", "Qwen/Qwen3-8B", 8.2e9, _qwen3(4096, 12288, 36, 32, 8, False)),
    Shape("qwen2.5-1.5b", "Qwen/Qwen2.5-1.5B-Instruct", 1.54e9,
          _qwen2(1536, 8960, 28, 12, 2, 151936, True, 32768, 1e-06)),
    Shape("qwen2.5-14b", "Qwen/Qwen2.5-14B (the -Instruct release has the same dimensions)", 14.7e9,
          _qwen2(5120, 13824, 48, 40, 8, 152064, False, 131072, 1e-05)),
    Shape("llama-3.1-8b", "meta-llama/Llama-3.1-8B-Instruct", 8.03e9, _llama(4096, 14336, 32, 32, 8)),
    Shape("llama-3.3-70b", "meta-llama/Llama-3.3-70B-Instruct", 70.6e9, _llama(8192, 28672, 80, 64, 8)),
)}


def shape_for(name_or_path: str) -> Shape:
    """The table entry named ``name_or_path``, or whose name starts the path's last component.

    ``/ckpt/Qwen2.5-14B-Instruct-thinking`` -> qwen2.5-14b (the longest matching name wins).
    ValueError listing the table when nothing matches.
    """
    key = name_or_path.rstrip("/").rsplit("/", 1)[-1].lower()
    if key in SHAPES:
        return SHAPES[key]
    hits = [n for n in SHAPES if key.startswith(n)]
    if not hits:
        raise ValueError(f"no model shape named {name_or_path!r}; known shapes: {', '.join(SHAPES)} "
                         f"(or point the path at a dir with config.json / model_spec.json)")
    return SHAPES[max(hits, key=len)]
