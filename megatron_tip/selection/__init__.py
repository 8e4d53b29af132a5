"""Token selection for on-policy distillation (TIP): scores, policies, exact distributed top-k.

Pure functions of tensors and explicit process groups (``group=None`` = single process);
no global parallel state is read and inputs are never modified.
"""
from megatron_tip.selection.config import SelectionConfig
from megatron_tip.selection.policies import SelectionResult, select_tokens
from megatron_tip.selection.scores import BatchStats, batch_stats, classify, normalize, q3_score, rank_normalize, soft_or
from megatron_tip.selection.topk import distributed_quantile, distributed_topk_mask

__all__ = [
    "BatchStats", "SelectionConfig", "SelectionResult", "batch_stats", "classify", "distributed_quantile",
    "distributed_topk_mask", "normalize", "q3_score", "rank_normalize", "select_tokens", "soft_or",
]
