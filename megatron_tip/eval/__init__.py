"""Math evaluation: last-``\\boxed{}`` grading with math-verify, mean@k / pass@k, in-run held-out accuracy,
and the offline evaluator (``python -m megatron_tip.eval``, ``eval.runner``)."""
from .grading import extract_boxed, grade, is_equiv
from .metrics import aggregate, default_ks, mean_at_k, pass_at_k, problem_metrics

__all__ = ["aggregate", "default_ks", "extract_boxed", "grade", "is_equiv", "mean_at_k", "pass_at_k",
           "problem_metrics"]
