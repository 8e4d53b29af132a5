"""megatron_tip: on-policy knowledge distillation with token importance selection on megatron-core.

Data path (one sub-package per stage): rollout -> models -> ops -> selection -> loss -> trainer.
"""
__version__ = "0.1.0"
