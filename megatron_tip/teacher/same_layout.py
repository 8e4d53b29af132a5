"""The teacher in the student's layout (the default): a second GPTModel on the same groups."""
from __future__ import annotations

import contextlib
from typing import Optional

import torch

from megatron_tip.models.forward import final_hidden, output_logits, output_weight
from megatron_tip.rollout.layout import PaddedBatch
from megatron_tip.teacher.offload import HostOffload


class SameLayoutTeacher:
    """A frozen GPTModel stage built with the student's TP x PP and its vocab padding.

    Each rank holds the teacher shard matching its student shard, so hidden states come out
    where the student's are and the output layer's vocab shards already line up.
    """

    def __init__(self, model: torch.nn.Module, *, tp: int, pp: int, offload: Optional[HostOffload] = None) -> None:
        self.model = model
        self.layout = (tp, pp)
        self.offload = offload  # teacher.offload: weights on the host between scoring passes

    def final_hidden(self, batch: PaddedBatch, mbs: list[dict]) -> list[torch.Tensor]:
        """Final hidden states [s, b, H_T] per micro-batch of ``mbs`` (last stage; [] elsewhere)."""
        with self.offload.on_device() if self.offload is not None else contextlib.nullcontext():
            return final_hidden(self.model, mbs)

    def output_weight(self) -> torch.Tensor:
        """The output layer's weight shard [V_pad/TP, H_T] (the word embedding when tied)."""
        return output_weight(self.model)

    def output_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden`` [n, H_T] -> logits [n, V_pad/TP] through the teacher's own output layer."""
        return output_logits(self.model, hidden)
