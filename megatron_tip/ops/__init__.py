"""Vocab-parallel math on sharded logits: pure functions of tensors and an explicit tp_group.

Names are imported on first use (PEP 562), so the torch-free ``ops.impls`` imports alone.
"""
from megatron_tip.lazy_exports import lazy_exports

_EXPORTS = {
    "vocab_parallel_linear_reverse_kl": "fused_linear_rkl",
    **dict.fromkeys(("TokenStats", "VocabParallelTokenStatsMath", "vocab_parallel_reverse_kl",
                     "vocab_parallel_token_stats"), "token_stats"),
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
