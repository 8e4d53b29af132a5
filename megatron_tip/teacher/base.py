"""What scoring, selection and the loss need from a teacher, whatever its layout.

A teacher gives, on every last pipeline stage of the *student*:
- ``final_hidden(batch, mbs)``: its final hidden states [s, b, H_T] for each of the student's
  micro-batches (the rows and positions of ``mbs``, this student data-parallel rank's rows);
- ``output_weight()``: its output layer's weight shard [V_pad/TP, H_T] in the *student's* vocab
  layout (the same padded vocab, TP shards that line up column by column with the student's), so
  ``ops.vocab_parallel_linear_reverse_kl`` and ``ops.vocab_parallel_token_stats`` take it unchanged;
- ``output_logits(hidden)``: ``hidden`` [n, H_T] -> logits [n, V_pad/TP] with that weight.
Off the student's last stage ``final_hidden`` returns [] (it is still collective: call it on
every rank). A remote teacher would implement the same three methods.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from megatron_tip.rollout.layout import PaddedBatch


@runtime_checkable
class Teacher(Protocol):
    """A frozen teacher as the scoring pass and the gradient pass use it."""

    layout: tuple[int, int]  # the teacher's own (tensor_parallel, pipeline_parallel)

    def final_hidden(self, batch: PaddedBatch, mbs: list[dict]) -> list[torch.Tensor]:
        """Per student micro-batch [s, b, H_T] (student last stage; [] elsewhere); collective."""
        ...

    def output_weight(self) -> torch.Tensor:
        """Output layer weight shard [V_pad/TP, H_T] in the student's vocab layout (student last stage)."""
        ...

    def output_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden`` [n, H_T] -> vocab-sharded logits [n, V_pad/TP] (student's layout)."""
        ...
