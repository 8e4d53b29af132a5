"""Token selection for on-policy distillation (TIP): scores, policies, exact distributed top-k.

Pure functions of tensors and explicit process groups (``group=None`` = single process);
no global parallel state is read and inputs are never modified. Names are imported on first use
(PEP 562), so the torch-free ``selection.config`` imports alone.
"""
from megatron_tip.lazy_exports import lazy_exports
from megatron_tip.selection.config import SelectionConfig

_EXPORTS = {
    **dict.fromkeys(("inclusion_probabilities", "inverse_inclusion_weights"), "inclusion"),
    **dict.fromkeys(("SelectionResult", "select_tokens"), "policies"),
    **dict.fromkeys(("BatchStats", "batch_stats", "classify", "normalize", "q3_score", "rank_normalize",
                     "soft_or"), "scores"),
    **dict.fromkeys(("distributed_quantile", "distributed_topk_mask"), "topk"),
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = ["SelectionConfig", *_EXPORTS]
