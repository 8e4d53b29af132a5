"""Capacity planner: will a TIP run fit, and how long will a step take (``python -m megatron_tip.plan``).

``plan_config`` reads the same config the trainer reads; ``preflight`` is what the trainer prints
once at start-up. Formulas and assumptions: docs/planner.md.
"""
from __future__ import annotations

from typing import Any, Optional

from megatron_tip.plan.inputs import PlanInputs, Runtime, Settings, Workload, inputs_from_config
from megatron_tip.plan.memory import plan_memory
from megatron_tip.plan.report import build_plan, format_plan

__all__ = ["PlanInputs", "Runtime", "Settings", "Workload", "build_plan", "default_target", "format_plan",
           "inputs_from_config",
           "plan_config", "plan_memory", "preflight"]


def plan_config(cfg: Any, **kwargs: Any) -> tuple[PlanInputs, dict[str, Any]]:
    """(inputs, plan dict) for a RunConfig; kwargs as ``inputs_from_config``."""
    inp = inputs_from_config(cfg, **kwargs)
    return inp, build_plan(inp)


def _local_device() -> Optional[str]:
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name().lower()
    for key, dev in (("h200", "h200-141gb"), ("h100", "h100-80gb"), ("a100", "a100-80gb")):
        if key in name:
            return dev
    return "h100-80gb"


def default_target(cfg: Any, shapes: Optional[dict[str, Optional[str]]] = None) -> str:
    """What ``--gpu auto`` plans: this machine's GPU; without one, its CPU when both of the config's
    models are directories here (the run the trainer would start here), else an H100 node."""
    from pathlib import Path

    gpu = _local_device()
    if gpu:
        return gpu
    here = all(Path(p).is_dir() for p in (cfg.student.path, cfg.teacher.path)) and not any((shapes or {}).values())
    return "cpu" if here else "h100-80gb"


def preflight(cfg: Any, ctx: Any, student_spec: Any, teacher_spec: Any) -> str:
    """The plan of this run on this machine's layout, as text (the trainer prints it once).

    On a GPU the device figures of the matching part are used (H100 when unknown); on CPU the
    memory model runs with the CPU runtime (unfused attention, torch AdamW) against this machine's
    RAM, and no timing: the same report as ``python -m megatron_tip.plan --gpu cpu``.
    """
    from megatron_tip.plan.inputs import CPU_RUNTIME

    gpu = _local_device()
    inp = inputs_from_config(cfg, gpu=gpu or "cpu", world_size=ctx.world_size, student=student_spec,
                             teacher=teacher_spec, runtime=None if gpu else CPU_RUNTIME)
    from megatron_tip.plan.tokens import format_tokens, plan_tokens

    inp = inp.with_(student_source=str(cfg.student.path), teacher_source=str(cfg.teacher.path))
    tokens = format_tokens(plan_tokens(cfg, dp=inp.layout.dp))
    return "\n".join([format_plan(inp, build_plan(inp), title="preflight"), ""] + tokens)
