"""Rollout engines behind one interface; ``build_engine`` is the one place that picks one.

Engines import their heavy dependencies lazily, so this package imports without vLLM.
"""
from __future__ import annotations

from typing import Any

from megatron_tip.rollout.base import Rollout, RolloutEngine, SamplingParams
from megatron_tip.rollout.config import ENGINES, RolloutConfig

__all__ = ["ENGINES", "Rollout", "RolloutConfig", "RolloutEngine", "SamplingParams", "build_engine"]


def build_engine(cfg: RolloutConfig, *, model: Any, ctx: Any, vocab_size: int, pad_id: int,
                 hf_dir: str, dtype: str, max_model_len: int, seed: int, micro_batch_size: int) -> RolloutEngine:
    """The rollout engine ``cfg.engine`` for this rank.

    megatron: samples with the student ``model`` itself (any TP/PP). vllm: one colocated engine
    per rank started from the student's HF dir ``hf_dir`` (external launcher, PP=1).
    """
    if cfg.engine == "megatron":
        from megatron_tip.rollout.megatron_engine import MegatronEngine

        return MegatronEngine(model, ctx=ctx, vocab_size=vocab_size, pad_id=pad_id,
                              micro_batch_size=micro_batch_size)
    from megatron_tip.rollout.colocated import TPColocatedEngine
    from megatron_tip.rollout.vllm_engine import VLLMEngine

    return TPColocatedEngine(lambda **parallel: VLLMEngine(
        hf_dir, dtype=dtype, gpu_memory_utilization=cfg.vllm_gpu_memory_utilization,
        max_model_len=max_model_len, seed=seed, **parallel), ctx=ctx)
