"""One entry point for torch.distributed + megatron parallel_state.

``init_parallel()`` reads the usual launcher environment (torchrun: RANK/WORLD_SIZE/LOCAL_RANK/
MASTER_ADDR/MASTER_PORT; plain srun: SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID), picks gloo
without CUDA and NCCL with it, initializes megatron's model-parallel groups, and returns a
``ParallelContext``. The rest of the package reads ranks and groups only from that object.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Optional

import torch
import torch.distributed as dist

from megatron_tip.sections import ParallelConfig  # noqa: F401 (re-export: the section's old import path)


@dataclass
class ParallelContext:
    """Ranks and process groups of this process (TP x CP x DP x PP, megatron order)."""

    rank: int
    world_size: int
    local_rank: int
    tp: int
    pp: int
    cp: int
    dp: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    tp_group: Any
    pp_group: Any
    dp_group: Any  # data-parallel (with context parallel folded in: the gradient-reduce group)
    device: torch.device
    backend: str

    @property
    def is_last_stage(self) -> bool:
        """Only the last pipeline stage holds logits: it scores, selects and computes the loss.

        Its data-parallel group contains only last-stage ranks, so ``dp_group`` is the group
        for global-batch selection statistics there.
        """
        return self.pp_rank == self.pp - 1


def from_last_stage(ctx: ParallelContext, value: Any) -> Any:
    """Collective over the pipeline group: the last stage's ``value`` on every stage.

    Only the last stage holds logits, so only it has selection metrics, the loss and graded
    answers. ``value``: a tensor (same shape and dtype on every stage; filled in place and
    returned) or any picklable object (the other stages' argument is ignored). PP=1: ``value``.
    """
    if ctx.pp == 1:
        return value
    src = dist.get_global_rank(ctx.pp_group, ctx.pp - 1)
    if isinstance(value, torch.Tensor):
        dist.broadcast(value, src=src, group=ctx.pp_group)
        return value
    box = [value if ctx.is_last_stage else None]
    dist.broadcast_object_list(box, src=src, group=ctx.pp_group)
    return box[0]


def check_parallel_sizes(world_size: int, *, tp: int, pp: int, cp: int = 1) -> int:
    """Validate a layout and return the data-parallel size; ValueError names the numbers."""
    for name, v in (("tensor_parallel", tp), ("pipeline_parallel", pp), ("context_parallel", cp)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} size must be a positive int, got {v!r}")
    mp = tp * pp * cp
    if world_size % mp:
        raise ValueError(
            f"world size {world_size} is not divisible by tensor_parallel ({tp}) x "
            f"pipeline_parallel ({pp}) x context_parallel ({cp}) = {mp}")
    return world_size // mp


def _env_int(*names: str, default: Optional[int] = None) -> int:
    for n in names:
        if n in os.environ:
            return int(os.environ[n])
    if default is None:
        raise RuntimeError(f"none of the environment variables {names} is set")
    return default


def init_parallel(
    tp: int = 1,
    *,
    pp: int = 1,
    cp: int = 1,
    seed: int = 1234,
    timeout_s: float = 600.0,
) -> ParallelContext:
    """Initialize torch.distributed (if needed) and megatron model parallelism.

    Without a launcher (no RANK/SLURM_PROCID in the environment) this starts a single-process
    group on a free local port, so the same code runs from a plain ``python -m``.
    """
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    from megatron_tip.compat.cpu import apply_cpu_shims
    from megatron_tip.compat.rope import apply_rope_without_empty_cat

    use_cuda = torch.cuda.is_available()
    apply_cpu_shims()
    apply_rope_without_empty_cat()  # bitwise megatron's values, one copy fewer (compat/rope.py)
    if not dist.is_initialized():
        rank = _env_int("RANK", "SLURM_PROCID", default=0)
        world = _env_int("WORLD_SIZE", "SLURM_NTASKS", default=1)
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if "MASTER_PORT" not in os.environ:
            if world > 1:
                raise RuntimeError("MASTER_PORT is not set; launch with torchrun or set it for srun")
            from megatron_tip.launch import free_port

            os.environ["MASTER_PORT"] = str(free_port())
        local_rank = _env_int("LOCAL_RANK", "SLURM_LOCALID", default=0)
        if use_cuda:
            torch.cuda.set_device(local_rank % torch.cuda.device_count())
        dist.init_process_group(
            "nccl" if use_cuda else "gloo", rank=rank, world_size=world,
            timeout=timedelta(seconds=timeout_s))
    world = dist.get_world_size()
    rank = dist.get_rank()
    local_rank = _env_int("LOCAL_RANK", "SLURM_LOCALID", default=0)
    dp = check_parallel_sizes(world, tp=tp, pp=pp, cp=cp)
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        context_parallel_size=cp)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    torch.manual_seed(seed)
    return ParallelContext(
        rank=rank, world_size=world, local_rank=local_rank, tp=tp, pp=pp, cp=cp, dp=dp,
        tp_rank=ps.get_tensor_model_parallel_rank(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        dp_rank=ps.get_data_parallel_rank(with_context_parallel=True),
        tp_group=ps.get_tensor_model_parallel_group(),
        pp_group=ps.get_pipeline_model_parallel_group(),
        dp_group=ps.get_data_parallel_group(with_context_parallel=True),
        device=torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu"),
        backend=dist.get_backend(),
    )


def destroy_parallel() -> None:
    """Tear down megatron groups and the default process group."""
    from megatron.core import parallel_state as ps

    ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
