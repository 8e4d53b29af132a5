"""Activation memory of one transformer layer for one micro-batch, as megatron-core saves it.

Two layer implementations, the two the builder can produce:

- ``unfused``: megatron's local spec (torch RMSNorm, unfused ``DotProductAttention``). What runs
  on CPU and on a GPU without Transformer Engine. The counts below were read off the tensors
  autograd saves in megatron-core 0.16.1 (tests/integration/test_plan_model_counts.py re-derives them
  from a built layer) and assume GQA (heads > KV heads: K and V are expanded to every head).
- ``flash``: the Transformer Engine spec (fused LayerNorm+Linear, flash attention). Derived from
  what those kernels save (input and normalized input of each LayerNorm+Linear, the qkv output,
  RoPE'd q and k, the attention output and its fp32 log-sum-exp, the fc1 output and the SwiGLU
  output); not measured here (no GPU), so treat it as an estimate.

All counts are elements per token of the micro-batch in the activation dtype; ``s`` is the
sequence length, TP divides the head and ffn dimensions (and the hidden ones with sequence
parallelism).
"""
from __future__ import annotations

from dataclasses import dataclass

from megatron_tip.models.spec import ModelSpec

RECOMPUTE = ("none", "selective", "full")
RECOMPUTE_METHODS = ("uniform", "block")


@dataclass(frozen=True)
class LayerDims:
    h: int
    a: float  # attention heads per TP rank
    g: float  # KV groups per TP rank
    d: int  # head dim
    f: float  # ffn width per TP rank
    hs: float  # hidden elements per token held per rank (h, or h / tp with sequence parallel)
    qk_norm: bool
    groups_per_rank: float

    @classmethod
    def of(cls, spec: ModelSpec, *, tp: int, sp: bool) -> "LayerDims":
        return cls(h=spec.hidden_size, a=spec.num_attention_heads / tp, g=spec.num_query_groups / tp,
                   d=spec.head_dim, f=spec.ffn_hidden_size / tp, hs=spec.hidden_size / (tp if sp else 1),
                   qk_norm=spec.qk_layernorm, groups_per_rank=spec.num_query_groups / tp)


def _unfused_per_token(x: LayerDims, s: int, recompute: str) -> float:
    a, g, d = x.a, x.g, x.d
    norms = 2 * (3 * x.h + 1)  # each RMSNorm keeps x, rstd, x*rstd; its output feeds a linear
    mlp = 5 * x.f  # fc1 output (2f), silu output, the silu*gate product, fc2 input
    qk = 0.0
    if x.qk_norm:  # q/k RMSNorm inputs and outputs, and the fused qkv output they are views of
        qk = (a * d if x.groups_per_rank > 1 else 0) + a + a * d + (a + 2 * g) * d + g + g * d
    core = 3 * a * d + a * s  # q, K and V expanded to every head for the bmm, softmax probs
    if recompute == "selective":  # core attention recomputed: its inputs q, k stay, v is a view of qkv
        core = a * d + g * d + (0 if x.qk_norm else (a + 2 * g) * d)
    context = a * d  # attention output = linear_proj input
    return norms + qk + core + context + mlp


def _flash_per_token(x: LayerDims, recompute: str) -> float:
    a, g, d = x.a, x.g, x.d
    norms = 4 * x.hs  # LayerNorm+Linear (qkv, fc1): input and normalized input
    qkv = (a + 2 * g) * d  # fused qkv output (V and the q/k norm inputs are views of it)
    rope = (a + g) * d  # RoPE'd q and k
    out = a * d + 2 * a  # attention output (linear_proj input) + fp32 log-sum-exp
    if recompute == "selective":
        out = a * d  # log-sum-exp recomputed; flash attention keeps no s^2 term anyway
    qk = (a + g) if x.qk_norm else 0  # rstd of the q/k norms
    mlp = 3 * x.f  # fc1 output (SwiGLU input) + SwiGLU output (fc2 input)
    return norms + qkv + rope + out + qk + mlp


def layer_bytes(spec: ModelSpec, *, seq_len: int, micro_batch: int, tp: int, sp: bool,
                act_bytes: int, attention: str, recompute: str = "none") -> int:
    """Bytes one layer keeps for backward for one micro-batch [seq_len, micro_batch]."""
    x = LayerDims.of(spec, tp=tp, sp=sp)
    tokens = seq_len * micro_batch
    if attention == "unfused":
        mask = 0 if recompute == "selective" else seq_len * seq_len  # causal mask (bool)
        per_layer = mask + 4 * seq_len * spec.head_dim * 4  # + RoPE cos/sin (fp32)
        return int(tokens * _unfused_per_token(x, seq_len, recompute) * act_bytes + per_layer)
    if attention == "flash":
        return int(tokens * _flash_per_token(x, recompute) * act_bytes)
    raise ValueError(f"attention={attention!r}: must be flash or unfused")


def stage_activation_bytes(spec: ModelSpec, *, layers: int, seq_len: int, micro_batch: int, tp: int,
                           sp: bool, act_bytes: int, attention: str, recompute: str = "none",
                           method: str = "uniform", num_layers: int = 1) -> int:
    """Bytes ``layers`` layers of one pipeline stage keep for one micro-batch, with recomputation.

    full/uniform: each group of ``num_layers`` layers keeps only its input; during backward one
    group is recomputed at a time. full/block: the first ``num_layers`` layers keep only their
    input, the others keep everything. selective: core attention recomputed (see above).
    """
    if recompute not in RECOMPUTE:
        raise ValueError(f"recompute_granularity={recompute!r}: must be one of {RECOMPUTE}")
    full = layer_bytes(spec, seq_len=seq_len, micro_batch=micro_batch, tp=tp, sp=sp, act_bytes=act_bytes,
                       attention=attention, recompute="selective" if recompute == "selective" else "none")
    if recompute != "full":
        return layers * full
    if method not in RECOMPUTE_METHODS:
        raise ValueError(f"recompute_method={method!r}: must be one of {RECOMPUTE_METHODS}")
    n = max(1, min(num_layers, layers))
    inp = int(seq_len * micro_batch * spec.hidden_size / (tp if sp else 1) * act_bytes)
    if method == "uniform":
        return -(-layers // n) * inp + n * full
    return n * inp + (layers - n) * full + (full if n else 0)


def attention_score_buffer_bytes(spec: ModelSpec, *, seq_len: int, micro_batch: int, tp: int,
                                 act_bytes: int) -> int:
    """megatron's unfused attention writes Q K^T into a global buffer [b * heads, s, s] that it keeps."""
    return int(micro_batch * spec.num_attention_heads / tp * seq_len * seq_len * act_bytes)
