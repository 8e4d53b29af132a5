"""The scoring pass (no grad): teacher hidden states, then exact per-token statistics for every position.

Memory: both decoders run without their output layers; logits are computed from the final hidden
states ``score_chunk_tokens`` rows at a time and dropped after their statistics. Only the
teacher's hidden states [S, b, H] are kept, for the gradient pass to recompute teacher logits
at kept positions (docs/method.md, "Memory design of one step").
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from megatron_tip.models.forward import final_hidden, output_logits
from megatron_tip.ops import vocab_parallel_token_stats
from megatron_tip.ops.compiled import compute_dtype
from megatron_tip.rollout.layout import PaddedBatch, to_padded
from megatron_tip.sections import ScoringConfig
from megatron_tip.teacher.base import Teacher

STAT_FIELDS = ("norm_entropy", "reverse_kl", "forward_kl", "teacher_entropy", "target_logprob")


@dataclass
class ScoredBatch:
    """Everything the gradient pass needs from the scoring pass (last stage holds the stats)."""

    batch: PaddedBatch
    microbatches: list[dict]  # the layout the forwards run on (``rollout.layout.microbatches``)
    teacher_hidden: list[torch.Tensor]  # per micro-batch [s, b, H] (last stage; else empty)
    stats: Optional[dict[str, torch.Tensor]]  # [B, S] fp32 each in the padded view, 0 outside valid positions
    # (last stage; else None)
    student_hidden: Optional[list[torch.Tensor]] = None  # per micro-batch [s, b, H] with the student's
    # graph (scoring.one_student_forward); None: the gradient pass runs its own forward


def token_stats(student: torch.nn.Module, teacher: Teacher, mb: dict, hs: torch.Tensor,
                ht: torch.Tensor, *, cfg: ScoringConfig, vocab_size: int, tp_group: Any) -> dict[str, torch.Tensor]:
    """Per-token stats [b, s] of one micro-batch from final hidden states hs/ht [s, b, H], at its
    valid (response) positions only: prompt and pad positions are 0 (nothing reads them).

    Logits exist only ``cfg.score_chunk_tokens`` rows at a time. Every TP rank holds the same
    ``valid``, so all take part in the same chunks' collectives.
    """
    keep = mb["valid"].reshape(-1).nonzero()[:, 0]  # [n] rows of the row-major [b*S] view
    hs, ht = (h.transpose(0, 1).reshape(-1, h.shape[-1])[keep] for h in (hs, ht))  # [n, H]
    targets = mb["target_ids"].reshape(-1)[keep]
    step = cfg.score_chunk_tokens
    parts = []
    for i in range(0, hs.shape[0], step):
        parts.append(vocab_parallel_token_stats(
            output_logits(student, hs[i:i + step]), teacher.output_logits(ht[i:i + step]),
            tp_group=tp_group, vocab_size=vocab_size, chunk_size=cfg.stats_chunk_size,
            target_ids=targets[i:i + step], impl=cfg.ops_impl))
    shape = mb["input_ids"].shape
    dtype = compute_dtype(hs, ht)  # the ops' accumulation dtype, so a micro-batch without valid positions matches
    out = {}
    for k in STAT_FIELDS:
        full = torch.zeros(shape.numel(), dtype=dtype, device=keep.device)
        if parts:
            full[keep] = torch.cat([getattr(p, k) for p in parts])
        out[k] = full.reshape(shape)
    return out


@torch.no_grad()
def score_batch(batch: PaddedBatch, mbs: list[dict], *, student: torch.nn.Module, teacher: Teacher,
                cfg: ScoringConfig, vocab_size: int, tp_group: Any, keep_student_graph: bool = False) -> ScoredBatch:
    """Teacher hidden states (kept) and the student's token statistics for every position of ``batch``.

    Each micro-batch's stats [b, s] are scattered back to its rollouts' positions of the padded
    [B, S] view (``rollout.layout.to_padded``), so selection sees the same tensors in any layout.
    ``keep_student_graph`` (PP=1): the student's final hidden states keep their autograd graph
    (``ScoredBatch.student_hidden``) for the gradient pass.
    """
    teacher_hidden = teacher.final_hidden(batch, mbs)  # kept for the gradient pass (collective)
    # dropped after scoring, unless the gradient pass backpropagates through them (one_student_forward)
    student_hidden = final_hidden(student, mbs, with_graph=keep_student_graph)
    stats = None
    for mb, hs, ht in zip(mbs, student_hidden, teacher_hidden):
        part = token_stats(student, teacher, mb, hs.detach(), ht, cfg=cfg, vocab_size=vocab_size,
                           tp_group=tp_group)
        if stats is None:
            stats = {k: torch.zeros(batch.valid.shape, dtype=v.dtype, device=v.device) for k, v in part.items()}
        for k, v in part.items():
            to_padded(mb, v, stats[k])
    return ScoredBatch(batch, mbs, teacher_hidden, stats, student_hidden if keep_student_graph else None)
