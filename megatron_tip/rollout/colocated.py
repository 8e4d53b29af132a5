"""Put an external rollout engine (vLLM) beside a TP-sharded megatron student on every rank.

In a multi-rank run every rank builds its own engine in vLLM's ``external_launcher`` mode: the
engine joins our torch.distributed world instead of spawning workers, vLLM's tensor-parallel
group is the megatron TP group (consecutive ranks, PP=1), and each data-parallel replica
generates its own prompts independently (vLLM's "external DP"). Creating an engine on one rank
only would hang: vLLM's group creation is collective over the whole world.

The TP ranks of a replica receive the same prompts and seeds and vLLM schedules them
deterministically, so they generate the same tokens; TP rank 0's rollouts are still broadcast so
every TP rank trains on identical sequences even if that ever breaks. Weight sync is collective:
each rank gathers the full canonical weights and its engine loads its own TP slice of them.
"""
from __future__ import annotations

import os
from typing import Callable, Iterable

import torch
import torch.distributed as dist

from megatron_tip.rollout.base import EngineBase, Rollout, SamplingParams
from megatron_tip.rollout.config import check_vllm_pipeline


def check_layout(ctx) -> None:
    """ValueError unless vLLM can colocate with this layout: PP=1, TP groups of consecutive ranks."""
    check_vllm_pipeline(ctx.pp)
    if ctx.tp > 1:
        tp_ranks = dist.get_process_group_ranks(ctx.tp_group)
        first = ctx.rank - ctx.tp_rank
        if tp_ranks != list(range(first, first + ctx.tp)):
            raise ValueError(f"vLLM's TP groups are consecutive ranks, but this rank's megatron TP group is "
                             f"{tp_ranks}; use the default rank order (tp first)")


def external_launcher_kwargs(ctx) -> dict:
    """vLLM engine arguments that make every rank of ``ctx`` one TP rank of a colocated engine.

    Checks the layout vLLM assumes (:func:`check_layout`) and exports the RANK/LOCAL_RANK
    variables its external-launcher executor reads (srun does not set them).
    """
    check_layout(ctx)
    if ctx.world_size == 1:
        return {"tensor_parallel_size": 1}
    os.environ.setdefault("RANK", str(ctx.rank))
    os.environ.setdefault("LOCAL_RANK", str(ctx.local_rank))
    return {"tensor_parallel_size": ctx.tp, "distributed_executor_backend": "external_launcher"}


class TPColocatedEngine(EngineBase):
    """Builds one engine per rank with :func:`external_launcher_kwargs` and keeps TP ranks in step."""

    def __init__(self, make_engine: Callable[..., object], *, ctx) -> None:
        self.ctx = ctx
        self.engine = make_engine(**external_launcher_kwargs(ctx))
        self._src = dist.get_global_rank(ctx.tp_group, 0) if ctx.tp > 1 else ctx.rank

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Rollout]:
        """Every rank of a TP group must call this with the same prompts and params (collective)."""
        box = [self.engine.generate(prompts, params)]
        if self.ctx.tp > 1:
            dist.broadcast_object_list(box, src=self._src, group=self.ctx.tp_group)
        return box[0]

    def sync_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load full (TP-gathered) HF-named weights; each rank's engine keeps its own slice."""
        self.engine.sync_weights(named_tensors)

    def sleep(self) -> None:
        """Free this rank's engine memory until the next sync (no-op unless the engine sleeps)."""
        self.engine.sleep()

    def close(self) -> None:
        """Shut this rank's engine down (local; call after the last collective)."""
        self.engine.close()
