"""Put an external rollout engine (vLLM) beside a TP-sharded megatron student.

One engine per data-parallel replica lives on its tensor-parallel rank 0; it samples and the
rollouts are broadcast to the other TP ranks, so every TP rank trains on identical sequences.
Weight sync is collective: all TP ranks gather the canonical weights, TP rank 0 pushes them.
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.distributed as dist

from megatron_tip.rollout.base import Rollout, SamplingParams


class TPColocatedEngine:
    """Wraps an engine factory so only TP rank 0 of each replica builds and drives it."""

    def __init__(self, make_engine, *, ctx) -> None:
        if ctx.world_size > 1:
            # Measured: an in-process vLLM engine on rank 0 of a 2-rank gloo world hangs in its own
            # torch.distributed set-up (its group creation is collective over our world). Running
            # it colocated needs vLLM's external-launcher mode on every rank; not done yet.
            raise ValueError(f"rollout.engine=vllm supports single-process runs only (world size is "
                             f"{ctx.world_size}); use rollout.engine=megatron for TP/PP/DP runs")
        if ctx.pp > 1:
            raise ValueError("rollout.engine=vllm needs pipeline_parallel=1 (weights are pushed from "
                             "the TP group of a single stage); use engine=megatron with PP>1")
        self.ctx = ctx
        self.engine = make_engine() if ctx.tp_rank == 0 else None
        self._src = dist.get_global_rank(ctx.tp_group, 0) if ctx.tp > 1 else ctx.rank

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Rollout]:
        box = [self.engine.generate(prompts, params) if self.engine is not None else None]
        if self.ctx.tp > 1:
            dist.broadcast_object_list(box, src=self._src, group=self.ctx.tp_group)
        return box[0]

    def sync_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        if self.engine is not None:
            self.engine.sync_weights(named_tensors)
        else:
            for _ in named_tensors:  # drain the generator: it may hold collectives
                pass
