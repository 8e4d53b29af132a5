"""The teacher in a layout of its own (``teacher.parallel``), time-shared on the student's ranks.

- Built on its own process groups (``teacher.groups``): megatron-core's GPTModel, its layers and
  the non-interleaved pipeline schedule take them from the ``ProcessGroupCollection``; the rest of
  the process keeps megatron's global ``parallel_state`` for the student.
- Scoring: every rank learns the global batch's token ids (``exchange.gather_rows``), each teacher
  DP rank runs its slice of rows (no grad, micro-batched like the student), and each row's final
  hidden states go point-to-point to the last-stage ranks of the student DP rank that owns it.
- Output layer: the teacher's vocab shards are gathered once at build time and re-split into the
  student's TP layout and vocab padding, so the fused exact reverse KL in ``ops`` is unchanged.
"""
from __future__ import annotations

import contextlib
from typing import Any, Optional

import torch
import torch.distributed as dist

from megatron_tip.models.forward import final_hidden, output_weight
from megatron_tip.rollout.layout import PaddedBatch, microbatches
from megatron_tip.teacher.exchange import (RankRoles, gather_rows, send_hidden, teacher_rows, to_microbatches)
from megatron_tip.teacher.groups import RoleGroups
from megatron_tip.teacher.offload import HostOffload


class OwnLayoutTeacher:
    """A frozen GPTModel stage in the teacher's own TP x PP, and its output weight in the student's layout."""

    def __init__(self, model: torch.nn.Module, groups: RoleGroups, roles: RankRoles, *, weight: Any,
                 student_dp_rank: int, student_last: bool, hidden_size: int, micro_batch_size: int,
                 max_tokens: int, device: torch.device, offload: Optional[HostOffload] = None) -> None:
        self.model, self.groups, self.roles = model, groups, roles
        self.layout = (groups.tp, groups.pp)
        self.weight = weight  # [V_pad/TP_S, H_T] on the student's last stage, else None
        self.student_dp_rank, self.student_last = student_dp_rank, student_last
        self.hidden_size, self.device = hidden_size, device
        self.micro_batch_size, self.max_tokens = micro_batch_size, max_tokens
        self.dtype = next(model.parameters()).dtype
        self.offload = offload  # teacher.offload: the whole model on the host between scoring passes

    @torch.no_grad()
    def final_hidden(self, batch: PaddedBatch, mbs: list[dict]) -> list[torch.Tensor]:
        """Collective over the world: this student DP rank's rows' hidden states [s, b, H_T] per micro-batch."""
        rows = gather_rows(batch, self.roles)
        mine = teacher_rows(rows.offsets[-1], teacher_dp=self.groups.dp, dp_rank=self.groups.dp_rank)
        with self.offload.on_device() if self.offload is not None else contextlib.nullcontext():
            sent = self._score(rows, mine)
        received = send_hidden(sent, rows, self.roles, hidden_size=self.hidden_size, dtype=self.dtype,
                               device=self.device)
        if not self.student_last:
            return []
        return to_microbatches(received, mbs, first_row=rows.offsets[self.student_dp_rank],
                               width=batch.input_ids.shape[1], hidden_size=self.hidden_size, dtype=self.dtype,
                               device=self.device)

    def _score(self, rows, mine: range) -> dict[int, torch.Tensor]:
        """Forward of the teacher's rows ``mine``; their hidden states [L_g, H] by global row (last stage)."""
        if not len(mine):
            return {}
        idx = torch.arange(mine.start, mine.stop, device="cpu")  # host, like the lengths it indexes
        lengths = rows.lengths[idx]
        width = int(lengths.max())
        ids = rows.input_ids[idx.to(rows.input_ids.device), :width]
        zeros = torch.zeros_like(ids)
        tb = PaddedBatch(input_ids=ids, target_ids=zeros, valid=zeros.bool(),
                         position_ids=rows.position_ids[idx.to(ids.device), :width], lengths=lengths)
        tmbs = microbatches(tb, size=min(self.micro_batch_size, len(mine)), max_tokens=self.max_tokens)
        hidden = final_hidden(self.model, tmbs, pg_collection=self.groups.pg_collection)
        out: dict[int, torch.Tensor] = {}
        for mb, h in zip(tmbs, hidden):  # h: [s, b, H]
            for j, r in enumerate(mb["rows"].tolist()):
                out[mine.start + r] = h[: int(lengths[r]), j]
        return out

    def output_weight(self) -> torch.Tensor:
        """The teacher's output weight re-split to the student's TP layout: [V_pad/TP_S, H_T]."""
        return self.weight

    def output_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden`` [n, H_T] -> logits [n, V_pad/TP_S] (what the output layer's forward computes)."""
        return torch.nn.functional.linear(hidden, self.weight)


def student_layout_weight(model: torch.nn.Module, groups: RoleGroups, *, vocab_size: int, hidden_size: int,
                          padded_vocab: int, student_tp: int, student_tp_rank: int, student_last: bool,
                          dtype: torch.dtype, device: torch.device) -> Any:
    """Collective over the world: the teacher's output weight as the student's TP shard (student last stage).

    The teacher's last stage gathers its vocab shards over its TP group, one rank broadcasts the
    true-vocab rows [V, H_T] (once, at build time), and each student last-stage rank keeps its rows
    of the student's padded vocab (``padded_vocab`` rows; rows at or past ``vocab_size`` are zero).
    """
    full = torch.empty(vocab_size, hidden_size, dtype=dtype, device=device)
    pgc = groups.pg_collection
    if groups.is_last_stage:
        shard = output_weight(model).detach()
        shards = [torch.empty_like(shard) for _ in range(groups.tp)]
        dist.all_gather(shards, shard.contiguous(), group=pgc.tp)
        if groups.tp_rank == 0 and groups.dp_rank == 0:
            full.copy_(torch.cat(shards)[:vocab_size])
    # The source: the teacher's TP rank 0, DP rank 0, last stage (the same global rank everywhere).
    flag = torch.tensor([int(groups.is_last_stage and groups.tp_rank == 0 and groups.dp_rank == 0)], device=device)
    flags = [torch.zeros_like(flag) for _ in range(dist.get_world_size())]
    dist.all_gather(flags, flag)
    src = [int(f) for f in flags].index(1)
    dist.broadcast(full, src=src)
    if not student_last:
        return None
    per = padded_vocab // student_tp
    start = student_tp_rank * per
    out = torch.zeros(per, hidden_size, dtype=dtype, device=device)
    rows = full[start:min(start + per, vocab_size)]
    out[: rows.shape[0]] = rows
    return out
