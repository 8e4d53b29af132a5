"""Math evaluation: last-``\\boxed{}`` grading with math-verify, mean@k / pass@k, prompts, HF runner."""
from .grading import extract_boxed, grade, is_equiv
from .metrics import aggregate, default_ks, mean_at_k, pass_at_k, problem_metrics
from .prompts import INSTRUCTION, PromptFormat, build_prompt, resolve_format

__all__ = ["INSTRUCTION", "PromptFormat", "aggregate", "build_prompt", "default_ks", "extract_boxed", "grade",
           "is_equiv", "mean_at_k", "pass_at_k", "problem_metrics", "resolve_format"]
