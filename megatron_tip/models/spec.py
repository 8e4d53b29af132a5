"""A plain, framework-neutral description of a decoder-only LLM.

One ``ModelSpec`` is enough to build the megatron-core GPTModel (``models.builder``), to map HF
checkpoints in and out (``convert``), and to size memory. It is what a checkpoint stores beside
its weights so the model can be rebuilt without the HF config.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional


VOCAB_DIVISIBLE_BY = 128  # megatron's default make-vocab-size-divisible-by
HF_ROPE_LAYOUTS = ("legacy", "rope_parameters")


def padded_vocab(vocab_size: int, *, tp: int, divisible_by: int = VOCAB_DIVISIBLE_BY) -> int:
    """``vocab_size`` rounded up so each of ``tp`` vocab shards is a multiple of ``divisible_by``."""
    multiple = divisible_by * tp
    return -(-vocab_size // multiple) * multiple


@dataclass
class ModelSpec:
    """Architecture of a Llama/Qwen-style decoder (RMSNorm, SwiGLU, RoPE)."""

    family: str  # "llama", "qwen2", "qwen3" (exact HF model_type)
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_query_groups: int  # = num_key_value_heads (GQA)
    ffn_hidden_size: int
    vocab_size: int  # true vocab (HF config.vocab_size); megatron pads on top of it
    kv_channels: Optional[int] = None  # head_dim; None -> hidden / heads
    max_position_embeddings: int = 4096
    rotary_base: float = 10000.0
    rope_scaling: Optional[dict[str, Any]] = None  # llama3 scaling: rope_type, factor, low/high_freq_factor, original_max_position_embeddings
    norm_epsilon: float = 1e-6
    qk_layernorm: bool = False  # Qwen3
    add_qkv_bias: bool = False  # Qwen2 / Qwen2.5
    tie_word_embeddings: bool = False
    extra_hf_config: dict[str, Any] = field(default_factory=dict)  # round-trips to config.json
    # How config.json spelled RoPE: "legacy" (rope_theta + rope_scaling: transformers 4.x and Hub
    # checkpoints) or "rope_parameters" (transformers 5.x). Export writes it back the same way.
    hf_rope_layout: str = "legacy"

    def __post_init__(self) -> None:
        for name in ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups",
                     "ffn_hidden_size", "vocab_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"ModelSpec.{name} must be a positive int, got {v!r}")
        if self.num_attention_heads % self.num_query_groups:
            raise ValueError(
                f"ModelSpec: num_attention_heads={self.num_attention_heads} is not divisible by "
                f"num_query_groups={self.num_query_groups}")
        if self.kv_channels is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"ModelSpec: hidden_size={self.hidden_size} not divisible by "
                    f"num_attention_heads={self.num_attention_heads}; set kv_channels")
            self.kv_channels = self.hidden_size // self.num_attention_heads
        if self.hf_rope_layout not in HF_ROPE_LAYOUTS:
            raise ValueError(f"ModelSpec.hf_rope_layout must be one of {HF_ROPE_LAYOUTS}, got {self.hf_rope_layout!r}")

    @property
    def head_dim(self) -> int:
        return int(self.kv_channels)

    def padded_vocab_size(self, tp: int, divisible_by: int = VOCAB_DIVISIBLE_BY) -> int:
        """Vocab rows after padding so each of ``tp`` shards is a multiple of ``divisible_by``."""
        return padded_vocab(self.vocab_size, tp=tp, divisible_by=divisible_by)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelSpec":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"ModelSpec: unknown field(s) {sorted(unknown)}")
        return cls(**d)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True))

    @classmethod
    def load(cls, path: str | Path) -> "ModelSpec":
        return cls.from_dict(json.loads(Path(path).read_text()))


def check_model_parallel(spec: ModelSpec, *, tp: int, pp: int, name: str = "", key_prefix: str = "") -> None:
    """Fail fast (ValueError naming the model and the numbers) on layouts megatron would assert or hang on.

    ``key_prefix``: the config section of the sizes when it is not the shared ``parallel`` one
    (``"teacher.parallel."``: the message then names the key to change).

    The one layout check of a model: the trainer (before any weight loads), the model builder,
    the converter and the planner all call it, so they refuse the same layouts with the same words.
    """
    checks = [
        ("num_attention_heads", spec.num_attention_heads, tp, "tensor_parallel"),
        ("num_query_groups", spec.num_query_groups, tp, "tensor_parallel"),
        ("ffn_hidden_size", spec.ffn_hidden_size, tp, "tensor_parallel"),
        ("num_layers", spec.num_layers, pp, "pipeline_parallel"),
    ]
    for field_name, value, size, pname in checks:
        if value % size:
            what = f"{name} " if name else ""
            raise ValueError(f"{what}{field_name}={value} is not divisible by {key_prefix}{pname} size {size}")
