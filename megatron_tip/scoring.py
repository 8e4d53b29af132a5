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

from megatron_tip.models.forward import capture_hidden, output_logits, output_positions, run_microbatches
from megatron_tip.ops import vocab_parallel_token_stats
from megatron_tip.rollout.layout import PaddedBatch, to_padded
from megatron_tip.sections import ScoringConfig

STAT_FIELDS = ("norm_entropy", "reverse_kl", "forward_kl", "teacher_entropy", "target_logprob")


@dataclass
class ScoredBatch:
    """Everything the gradient pass needs from the scoring pass (last stage holds the stats)."""

    batch: PaddedBatch
    microbatches: list[dict]  # the layout the forwards run on (``rollout.layout.microbatches``)
    teacher_hidden: list[torch.Tensor]  # per micro-batch [s, b, H] (last stage; else empty)
    stats: Optional[dict[str, torch.Tensor]]  # [B, S] fp32 each in the padded view, 0 at unscored positions
    # (last stage; else None)


def final_hidden(model: torch.nn.Module, mbs: list[dict]) -> list[torch.Tensor]:
    """Final hidden states [S, b, H] per micro-batch (last stage; [] elsewhere); no logits computed."""
    hidden: list[torch.Tensor] = []
    device = mbs[0]["input_ids"].device if mbs else torch.device("cpu")
    empty = (torch.zeros(0, dtype=torch.long, device=device), torch.zeros(0, dtype=torch.long, device=device))

    def no_loss(mb, out):
        return out.sum() * 0, torch.zeros((), dtype=torch.int, device=out.device), {}

    with capture_hidden(model, hidden):
        run_microbatches(model, mbs, no_loss, forward_only=True, prepare=lambda mb: output_positions(model, empty))
    return hidden


def token_stats(student: torch.nn.Module, teacher: torch.nn.Module, mb: dict, hs: torch.Tensor,
                ht: torch.Tensor, *, cfg: ScoringConfig, vocab_size: int, tp_group: Any) -> dict[str, torch.Tensor]:
    """Per-token stats [b, s] of one micro-batch from final hidden states hs/ht [s, b, H].

    Logits exist only ``cfg.score_chunk_tokens`` rows at a time.
    """
    hs, ht = (h.transpose(0, 1).reshape(-1, h.shape[-1]) for h in (hs, ht))  # [b*S, H], row-major
    targets = mb["target_ids"].reshape(-1)
    step = cfg.score_chunk_tokens
    parts = []
    for i in range(0, hs.shape[0], step):
        parts.append(vocab_parallel_token_stats(
            output_logits(student, hs[i:i + step]), output_logits(teacher, ht[i:i + step]),
            tp_group=tp_group, vocab_size=vocab_size, chunk_size=cfg.stats_chunk_size,
            target_ids=targets[i:i + step], impl=cfg.ops_impl))
    shape = mb["input_ids"].shape
    return {k: torch.cat([getattr(p, k) for p in parts]).reshape(shape) for k in STAT_FIELDS}


@torch.no_grad()
def score_batch(batch: PaddedBatch, mbs: list[dict], *, student: torch.nn.Module, teacher: torch.nn.Module,
                cfg: ScoringConfig, vocab_size: int, tp_group: Any) -> ScoredBatch:
    """Teacher hidden states (kept) and the student's token statistics for every position of ``batch``.

    Each micro-batch's stats [b, s] are scattered back to its rollouts' positions of the padded
    [B, S] view (``rollout.layout.to_padded``), so selection sees the same tensors in any layout.
    """
    teacher_hidden = final_hidden(teacher, mbs)  # kept for the gradient pass
    student_hidden = final_hidden(student, mbs)  # dropped after scoring
    stats = None
    for mb, hs, ht in zip(mbs, student_hidden, teacher_hidden):
        part = token_stats(student, teacher, mb, hs, ht, cfg=cfg, vocab_size=vocab_size, tp_group=tp_group)
        if stats is None:
            stats = {k: torch.zeros(batch.valid.shape, dtype=v.dtype, device=v.device) for k, v in part.items()}
        for k, v in part.items():
            to_padded(mb, v, stats[k])
    return ScoredBatch(batch, mbs, teacher_hidden, stats)
