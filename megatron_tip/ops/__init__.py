"""Vocab-parallel math on sharded logits: pure functions of tensors and an explicit tp_group."""
from megatron_tip.ops.fused_linear_rkl import vocab_parallel_linear_reverse_kl
from megatron_tip.ops.token_stats import (
    TokenStats,
    VocabParallelTokenStatsMath,
    vocab_parallel_reverse_kl,
    vocab_parallel_token_stats,
)

__all__ = [
    "TokenStats",
    "VocabParallelTokenStatsMath",
    "vocab_parallel_linear_reverse_kl",
    "vocab_parallel_reverse_kl",
    "vocab_parallel_token_stats",
]
