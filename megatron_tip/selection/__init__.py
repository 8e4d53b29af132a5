"""Token selection for on-policy distillation (TIP): scores, policies, exact distributed top-k.

Pure functions of tensors and explicit process groups (``group=None`` = single process);
no global parallel state is read and inputs are never modified.
"""
from megatron_tip.selection.config import SelectionConfig
from megatron_tip.selection.policies import SelectionResult, select_tokens
from megatron_tip.selection.scores import (Quadrants, classify_quadrants, q3_score, rank_normalize,
                                           soft_or, soft_or_scores)
from megatron_tip.selection.topk import distributed_quantile, distributed_topk_mask

__all__ = [
    "SelectionConfig", "SelectionResult", "select_tokens", "soft_or_scores", "soft_or", "q3_score",
    "rank_normalize", "classify_quadrants", "Quadrants", "distributed_topk_mask",
    "distributed_quantile",
]
