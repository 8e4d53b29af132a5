"""Put an external rollout engine (vLLM) beside a TP-sharded megatron student on every rank.

In a multi-rank run every rank builds its own engine in vLLM's ``external_launcher`` mode: the
engine joins our torch.distributed world instead of spawning workers. vLLM cuts the world into
TP groups of ``engine_tp`` consecutive ranks (``rollout.tensor_parallel``, dividing the student's
TP; PP=1) and treats each as an independent replica ("external DP"). So a student TP group of
``tp`` consecutive ranks holds ``tp / engine_tp`` whole engines.

A student data-parallel rank's prompts are split into ``tp / engine_tp`` contiguous shares, one
per engine of its TP group, each sampled with the seeds the whole list would give it
(``first_index``); the shares' rollouts are then gathered over the student TP group, so every TP
rank trains on the same rollouts, in prompt order, exactly as with one engine (whose ranks
generate identical tokens: same prompts, same seeds, deterministic scheduling; the engine's
first rank's copy is the one kept). Weight sync is collective: the student's shards are gathered
bucket by bucket (``rollout.weight_sync``) and every engine loads its own slice of each full tensor.
"""
from __future__ import annotations

import os
from typing import Callable, Iterable

import torch
import torch.distributed as dist

from megatron_tip.rollout.base import EngineBase, Rollout, SamplingParams
from megatron_tip.rollout.config import check_vllm_pipeline


def check_layout(ctx, *, engine_tp: int = 0) -> None:
    """ValueError unless vLLM can colocate with this layout: PP=1, TP groups of consecutive ranks,
    an engine TP (0: the student's) dividing the student's."""
    check_vllm_pipeline(ctx.pp)
    if engine_tp and (engine_tp > ctx.tp or ctx.tp % engine_tp):
        raise ValueError(f"rollout.tensor_parallel={engine_tp} must divide parallel.tensor_parallel={ctx.tp}")
    if ctx.tp > 1:
        tp_ranks = dist.get_process_group_ranks(ctx.tp_group)
        first = ctx.rank - ctx.tp_rank
        if tp_ranks != list(range(first, first + ctx.tp)):
            raise ValueError(f"vLLM's TP groups are consecutive ranks, but this rank's megatron TP group is "
                             f"{tp_ranks}; use the default rank order (tp first)")


def external_launcher_kwargs(ctx, *, engine_tp: int = 0) -> dict:
    """vLLM engine arguments that make every rank of ``ctx`` one TP rank of a colocated engine
    of ``engine_tp`` ranks (0: the student's TP).

    Checks the layout vLLM assumes (:func:`check_layout`) and exports the RANK/LOCAL_RANK
    variables its external-launcher executor reads (srun does not set them).
    """
    check_layout(ctx, engine_tp=engine_tp)
    if ctx.world_size == 1:
        return {"tensor_parallel_size": 1}
    os.environ.setdefault("RANK", str(ctx.rank))
    os.environ.setdefault("LOCAL_RANK", str(ctx.local_rank))
    return {"tensor_parallel_size": engine_tp or ctx.tp, "distributed_executor_backend": "external_launcher"}


def prompt_shares(n: int, *, parts: int) -> list[range]:
    """``parts`` contiguous index ranges covering 0..n-1, sizes differing by at most one (earlier first)."""
    base, extra = divmod(n, parts)
    bounds = [0]
    for k in range(parts):
        bounds.append(bounds[-1] + base + (k < extra))
    return [range(bounds[k], bounds[k + 1]) for k in range(parts)]


class TPColocatedEngine(EngineBase):
    """Builds one engine per rank with :func:`external_launcher_kwargs` and keeps TP ranks in step."""

    def __init__(self, make_engine: Callable[..., object], *, ctx, engine_tp: int = 0) -> None:
        self.ctx = ctx
        self.engine_tp = engine_tp or ctx.tp
        self.engine = make_engine(**external_launcher_kwargs(ctx, engine_tp=self.engine_tp))
        self.engines_per_group = ctx.tp // self.engine_tp
        self.share = ctx.tp_rank // self.engine_tp  # which engine of the TP group this rank belongs to

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Rollout]:
        """Every rank of a TP group must call this with the same prompts and params (collective).

        Returns the rollouts of all ``prompts``, prompt-major, ``prompt_index`` into ``prompts``.
        """
        if self.ctx.tp == 1:
            return self.engine.generate(prompts, params)
        shares = prompt_shares(len(prompts), parts=self.engines_per_group)
        mine = shares[self.share]
        rollouts = self.engine.generate([prompts[i] for i in mine], params, first_index=mine.start)
        out = []
        for k, share in enumerate(shares):  # engine k's first rank sends share k to the whole TP group
            box = [rollouts if self.share == k else None]
            dist.broadcast_object_list(box, src=dist.get_global_rank(self.ctx.tp_group, k * self.engine_tp),
                                       group=self.ctx.tp_group)
            for r in box[0]:
                r.prompt_index += share.start
                out.append(r)
        return out

    def sync_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load full (TP-gathered) HF-named weights; each rank's engine keeps its own slice."""
        self.engine.sync_weights(named_tensors)

    def sleep(self) -> None:
        """Free this rank's engine memory until the next sync (no-op unless the engine sleeps)."""
        self.engine.sleep()

    def close(self) -> None:
        """Shut this rank's engine down (local; call after the last collective)."""
        self.engine.close()
