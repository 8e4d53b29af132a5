"""The ``optim`` config section and the student's optimizer: megatron AdamW + cosine LR schedule."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from megatron_tip.validation import at_least, in_range


@dataclass
class OptimConfig:
    lr: float = 1e-6
    min_lr: float = 0.0
    warmup_steps: int = 0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    clip_grad: float = 1.0  # 0: no clipping

    def __post_init__(self) -> None:
        at_least("lr", self.lr, 0.0)
        in_range("min_lr", self.min_lr, 0.0, self.lr)
        at_least("warmup_steps", self.warmup_steps, 0)
        at_least("weight_decay", self.weight_decay, 0.0)
        in_range("adam_beta1", self.adam_beta1, 0.0, 1.0, high_open=True)
        in_range("adam_beta2", self.adam_beta2, 0.0, 1.0, high_open=True)
        at_least("clip_grad", self.clip_grad, 0.0)


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
        bf16=params_dtype == torch.bfloat16, params_dtype=params_dtype), [model])
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0 if cfg.warmup_steps else cfg.lr, max_lr=cfg.lr, min_lr=cfg.min_lr,
        lr_warmup_steps=cfg.warmup_steps, lr_decay_steps=max(total_steps, 1), lr_decay_style="cosine",
        start_wd=cfg.weight_decay, end_wd=cfg.weight_decay, wd_incr_steps=max(total_steps, 1),
        wd_incr_style="constant")
    return optimizer, scheduler
