"""Math evaluation: last-``\\boxed{}`` grading with math-verify, mean@k / pass@k, in-run held-out accuracy,
and the offline evaluator (``python -m megatron_tip.eval``, ``eval.runner``).

Names are imported on first use (PEP 562), so the torch-free ``eval.config`` imports alone.
"""
from megatron_tip.lazy_exports import lazy_exports

_EXPORTS = {
    **dict.fromkeys(("extract_boxed", "grade", "is_equiv"), "grading"),
    **dict.fromkeys(("aggregate", "default_ks", "mean_at_k", "pass_at_k", "problem_metrics"), "metrics"),
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
