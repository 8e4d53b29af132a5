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
from megatron_tip.rollout.layout import PaddedBatch
from megatron_tip.ops.compiled import IMPLS
from megatron_tip.validation import at_least, one_of

STAT_FIELDS = ("norm_entropy", "reverse_kl", "forward_kl", "teacher_entropy", "target_logprob")


@dataclass
class ScoringConfig:
    """The ``scoring`` config section: how token statistics are computed."""

    score_chunk_tokens: int = 512  # scoring pass: logits rows materialized at a time
    # Tokens per chunk inside the ops (None: from a byte budget and the V/TP shard width; docs/ops.md):
    # the stats op (scoring pass; unfused gradient pass): fp32 work buffers, default 16 MiB each;
    stats_chunk_size: Optional[int] = None
    # the fused output-layer op (fused gradient pass): [rows, V/TP] logits chunks, default 256 MiB.
    fused_chunk_size: Optional[int] = None
    vocab_size: Optional[int] = None  # shared true vocab; None: the tokenizer's length
    # Chunk kernels: auto (compiled for vocab shards >= 4096 columns, else eager; the environment
    # variable MEGATRON_TIP_OPS_IMPL overrides auto), eager, compiled (docs/ops.md).
    ops_impl: str = "auto"
    # Gradient pass: output layer fused into the reverse KL (no [n_kept, V/TP] logits held);
    # false applies both output layers and then the loss, as before (same math, more memory).
    fused_output_layer: bool = True
    # One student forward per step (PP=1, fused output layer; ignored otherwise): the scoring pass
    # keeps the student's graph and the gradient pass backpropagates from its kept positions, instead
    # of a no-grad scoring forward plus a second forward. Same numbers; memory: every micro-batch's
    # student activations live until the gradient pass (small models: the toy; docs/speed.md).
    one_student_forward: bool = False

    def __post_init__(self) -> None:
        one_of("ops_impl", self.ops_impl, IMPLS)
        at_least("score_chunk_tokens", self.score_chunk_tokens, 1)
        at_least("stats_chunk_size", self.stats_chunk_size, 1, optional=True)
        at_least("fused_chunk_size", self.fused_chunk_size, 1, optional=True)
        at_least("vocab_size", self.vocab_size, 1, optional=True)


@dataclass
class ScoredBatch:
    """Everything the gradient pass needs from the scoring pass (last stage holds the stats)."""

    batch: PaddedBatch
    microbatches: list[dict]  # the layout the forwards run on (``rollout.layout.microbatches``)
    teacher_hidden: list[torch.Tensor]  # per micro-batch [s, b, H] (last stage; else empty)
    stats: Optional[dict[str, torch.Tensor]]  # [B, S] fp32 each in the padded view, 0 at unscored positions
    # (last stage; else None)
    student_hidden: Optional[list[torch.Tensor]] = None  # per micro-batch [s, b, H] with the student's
    # graph (scoring.one_student_forward); None: the gradient pass runs its own forward


def final_hidden(model: torch.nn.Module, mbs: list[dict], *, with_graph: bool = False) -> list[torch.Tensor]:
    """Final hidden states [S, b, H] per micro-batch (last stage; [] elsewhere); no logits computed.

    ``with_graph``: PP=1 only; the forward records autograd (train mode) and the states keep it.
    """
    if with_graph:
        return _hidden_with_graph(model, mbs)
    hidden: list[torch.Tensor] = []
    device = mbs[0]["input_ids"].device if mbs else torch.device("cpu")
    empty = (torch.zeros(0, dtype=torch.long, device=device), torch.zeros(0, dtype=torch.long, device=device))

    def no_loss(mb, out):
        return out.sum() * 0, torch.zeros((), dtype=torch.int, device=out.device), {}

    with capture_hidden(model, hidden):
        run_microbatches(model, mbs, no_loss, forward_only=True, prepare=lambda mb: output_positions(model, empty))
    return hidden


def _hidden_with_graph(model: torch.nn.Module, mbs: list[dict]) -> list[torch.Tensor]:
    hidden = []
    model.train()  # the mode the gradient pass runs in
    with torch.enable_grad():
        for mb in mbs:
            s, b = mb["input_ids"].shape[1], mb["input_ids"].shape[0]
            grid = torch.arange(s * b, device=mb["input_ids"].device)
            with output_positions(model, (grid % b, grid // b), hidden_only=True):  # all positions, s-major
                out = model(mb["input_ids"], mb["position_ids"], None)  # [1, s*b, H]
            hidden.append(out[0].reshape(s, b, -1))
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
                cfg: ScoringConfig, vocab_size: int, tp_group: Any, keep_student_graph: bool = False) -> ScoredBatch:
    """Teacher hidden states (kept) and the student's token statistics for every position of ``batch``.

    ``keep_student_graph`` (PP=1): the student's final hidden states keep their autograd graph
    (``ScoredBatch.student_hidden``) for the gradient pass. Each micro-batch's stats [b, s] are scattered back to its rows and positions of the padded
    [B, S] view (``mb["rows"]``, positions 0..s-1), so selection sees the same tensors in any layout.
    """
    teacher_hidden = final_hidden(teacher, mbs)  # kept for the gradient pass
    # dropped after scoring, unless the gradient pass backpropagates through them (one_student_forward)
    student_hidden = final_hidden(student, mbs, with_graph=keep_student_graph)
    stats = None
    for mb, hs, ht in zip(mbs, student_hidden, teacher_hidden):
        part = token_stats(student, teacher, mb, hs.detach(), ht, cfg=cfg, vocab_size=vocab_size,
                           tp_group=tp_group)
        if stats is None:
            stats = {k: torch.zeros(batch.valid.shape, dtype=v.dtype, device=v.device) for k, v in part.items()}
        rows, s = mb["rows"], mb["input_ids"].shape[1]
        for k, v in part.items():
            stats[k][rows, :s] = v[: rows.numel()]
    return ScoredBatch(batch, mbs, teacher_hidden, stats, student_hidden if keep_student_graph else None)
