"""Trainer checkpoints: save, find the newest complete one, resume, drop partial ones.

A trainer checkpoint is a megatron checkpoint dir (student weights, any layout) plus per-rank
optimizer/scheduler state and ``trainer_state.json``, written last (see ``checkpoint.layout``).
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megatron_tip.checkpoint.layout import (
    TRAINER_STATE, complete_checkpoints, is_complete, optim_file, step_dir, step_dirs,
)
from megatron_tip.checkpoint.model import load_megatron_checkpoint, save_megatron_checkpoint
from megatron_tip.models.spec import ModelSpec


@dataclass
class RunDirConfig:
    """Where a run writes (``run.out_dir``) and how it checkpoints and resumes."""

    out_dir: str = "runs/default"
    resume: bool = False  # continue from the newest complete checkpoint under out_dir
    save_every: int = 0  # 0: save only at the end
    exit_interval: int = 0  # >0: checkpoint and exit after this many steps in this invocation


def save_training_checkpoint(out_dir: str, step: int, *, model: torch.nn.Module, optimizer: Any,
                             scheduler: Any, spec: ModelSpec, ctx: Any, hf_dir: str) -> Path:
    """Collective: student weights (dist_checkpointing) + optimizer/scheduler + step, atomically."""
    final = step_dir(out_dir, step)
    save_megatron_checkpoint(model, final, spec=spec, tp=ctx.tp, pp=ctx.pp, hf_dir=hf_dir,
                             overwrite=True, extra_metadata={"step": step})
    # Optimizer state per rank (same layout on resume), written beside, then the marker.
    target = optim_file(final, ctx.rank)
    tmp = target.with_name(target.name + ".tmp")
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp)
    os.replace(tmp, target)
    dist.barrier()
    if ctx.rank == 0:
        (final / TRAINER_STATE).write_text(json.dumps(
            {"step": step, "world_size": ctx.world_size, "tp": ctx.tp, "pp": ctx.pp}))
    dist.barrier()
    return final


def resume_training(out_dir: str, *, model: torch.nn.Module, optimizer: Any, scheduler: Any,
                    spec: ModelSpec, ctx: Any) -> int:
    """Load the newest complete checkpoint under ``out_dir``; returns the next step to run."""
    done = complete_checkpoints(out_dir)
    if not done:
        raise FileNotFoundError(f"run.resume=true but no complete checkpoint under {step_dir(out_dir, 0).parent}")
    ckpt = done[-1]
    state = json.loads((ckpt / TRAINER_STATE).read_text())
    if (state["world_size"], state["tp"], state["pp"]) != (ctx.world_size, ctx.tp, ctx.pp):
        raise ValueError(f"checkpoint {ckpt} was written at world={state['world_size']} tp={state['tp']} "
                         f"pp={state['pp']}; resume needs the same layout (optimizer state is per rank)")
    load_megatron_checkpoint(model, ckpt, vocab_size=spec.vocab_size)
    opt = torch.load(optim_file(ckpt, ctx.rank), weights_only=False)
    optimizer.load_state_dict(opt["optimizer"])
    scheduler.load_state_dict(opt["scheduler"])
    return int(state["step"]) + 1


def remove_incomplete_checkpoints(out_dir: str) -> None:
    """Drop step dirs without trainer_state.json (a run killed mid-save)."""
    for p in step_dirs(out_dir):
        if not is_complete(p):
            shutil.rmtree(p, ignore_errors=True)
