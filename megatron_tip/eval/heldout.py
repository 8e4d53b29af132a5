"""In-run evaluation: the ``eval`` config section, grading of rollouts, held-out accuracy.

Used by the trainer (rollout accuracy each step, held-out accuracy before/after training);
it needs only the grader, not the offline evaluator (``eval.runner``).
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.distributed as dist

from megatron_tip.distributed import from_last_stage
from megatron_tip.eval.config import EvalConfig  # noqa: F401 (re-export: the section's old import path)
from megatron_tip.eval.grading import grade
from megatron_tip.rollout.base import Rollout, SamplingParams


def count_correct(rollouts: Sequence[Rollout], answers: Sequence[str], *, tokenizer: Any) -> int:
    """How many rollouts end in a \\boxed{} answer equal to ``answers[r.prompt_index]`` (math-verify)."""
    return sum(grade(tokenizer.decode(r.response_ids, skip_special_tokens=True), answers[r.prompt_index])
               for r in rollouts)


def heldout_accuracy(engine: Any, prompts: Sequence[Any], params: SamplingParams, *, tokenizer: Any,
                     ctx: Any) -> dict[str, float]:
    """Accuracy of ``engine`` on ``prompts`` (each with .ids and .answer), sharded over data-parallel ranks.

    Collective over the whole world: every rank returns the same numbers.
    """
    mine = list(prompts)[ctx.dp_rank::ctx.dp]
    rollouts = engine.generate([p.ids for p in mine], params) if mine else []
    correct = count_correct(rollouts, [p.answer for p in mine], tokenizer=tokenizer)
    t = torch.tensor([float(correct), float(len(rollouts))], dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t, group=ctx.dp_group)
    from_last_stage(ctx, t)  # the last stage's grading (it decodes the same tokens) on every stage
    tag = "greedy" if params.temperature == 0 else f"T{params.temperature:g}"
    return {f"eval_acc_{tag}": float(t[0] / max(t[1], 1)), "eval_n": float(t[1])}
