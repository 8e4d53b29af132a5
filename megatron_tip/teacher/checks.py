"""The teacher's layout: what ``teacher.parallel`` resolves to, and the refusals of layouts that cannot work.

``check_teacher_layout`` runs inside ``run_checks.check_layout`` (trainer before any model loads,
and the planner): one line naming the ``teacher.parallel`` key and the numbers.
"""
from __future__ import annotations

from typing import Any, Optional

from megatron_tip.models.spec import ModelSpec, check_model_parallel


def teacher_layout(cfg: Any) -> tuple[int, int]:
    """The teacher's (tensor_parallel, pipeline_parallel): ``teacher.parallel``, the student's where unset."""
    return cfg.teacher.parallel.resolved(tensor_parallel=cfg.parallel.tensor_parallel,
                                         pipeline_parallel=cfg.parallel.pipeline_parallel)


def has_own_layout(cfg: Any) -> bool:
    """Whether the teacher runs in a layout other than the student's (its own process groups)."""
    return teacher_layout(cfg) != (cfg.parallel.tensor_parallel, cfg.parallel.pipeline_parallel)


def check_teacher_layout(cfg: Any, *, teacher: ModelSpec, world_size: Optional[int] = None) -> None:
    """ValueError (naming the key) when the teacher's layout does not fit its model or the ranks."""
    tp, pp = teacher_layout(cfg)
    own = has_own_layout(cfg)
    if own and world_size is not None and world_size % (tp * pp):
        raise ValueError(f"teacher.parallel: world size {world_size} is not divisible by "
                         f"teacher.parallel.tensor_parallel ({tp}) x teacher.parallel.pipeline_parallel ({pp}) "
                         f"= {tp * pp}")
    check_model_parallel(teacher, tp=tp, pp=pp, name="teacher", key_prefix="teacher.parallel." if own else "")


def check_teacher_source(cfg: Any) -> None:
    """A teacher in its own layout reads HF weights (each rank its own shard, no global groups needed)."""
    from megatron_tip.checkpoint.layout import is_hf_dir

    if has_own_layout(cfg) and not is_hf_dir(cfg.teacher.path):
        raise ValueError(f"teacher.parallel: a teacher in its own layout loads from an HF checkpoint dir; "
                         f"teacher.path={cfg.teacher.path!r} is a megatron checkpoint (convert it with "
                         f"python -m megatron_tip.convert megatron-to-hf, or leave teacher.parallel unset)")
