"""The ``optim`` config section and the student's optimizer: megatron AdamW + cosine LR schedule."""
from __future__ import annotations

from typing import Any

from megatron_tip.sections import OptimConfig  # noqa: F401 (re-export: the section's old import path)


def build_optimizer(model: Any, cfg: OptimConfig, *, params_dtype: Any, total_steps: int) -> tuple[Any, Any]:
    """(megatron optimizer, OptimizerParamScheduler) for a DDP-wrapped ``model``.

    Cosine decay from ``lr`` to ``min_lr`` over ``total_steps`` after ``warmup_steps`` of linear warmup.
    """
    import torch
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    optimizer = get_megatron_optimizer(OptimizerConfig(
        optimizer="adam", lr=cfg.lr, min_lr=cfg.min_lr, weight_decay=cfg.weight_decay,
        adam_beta1=cfg.adam_beta1, adam_beta2=cfg.adam_beta2, clip_grad=cfg.clip_grad,
        bf16=params_dtype == torch.bfloat16, params_dtype=params_dtype,
        use_distributed_optimizer=cfg.distributed_optimizer), [model])
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0 if cfg.warmup_steps else cfg.lr, max_lr=cfg.lr, min_lr=cfg.min_lr,
        lr_warmup_steps=cfg.warmup_steps, lr_decay_steps=max(total_steps, 1), lr_decay_style="cosine",
        start_wd=cfg.weight_decay, end_wd=cfg.weight_decay, wd_incr_steps=max(total_steps, 1),
        wd_incr_style="constant")
    return optimizer, scheduler
