"""Rollout engines behind one interface; ``make_engine`` picks one by name.

Engines import their heavy dependencies lazily, so this package imports without vLLM.
"""
from __future__ import annotations

from typing import Any

from megatron_tip.rollout.base import Rollout, RolloutEngine, SamplingParams

ENGINES = ("megatron", "vllm")

__all__ = ["ENGINES", "Rollout", "RolloutEngine", "SamplingParams", "make_engine"]


def make_engine(name: str, **kwargs: Any) -> RolloutEngine:
    """Construct the rollout engine ``name`` ("megatron" or "vllm") with the engine's own kwargs."""
    if name == "vllm":
        from megatron_tip.rollout.vllm_engine import VLLMEngine

        return VLLMEngine(**kwargs)
    if name == "megatron":
        from megatron_tip.rollout.megatron_engine import MegatronEngine

        return MegatronEngine(**kwargs)
    raise ValueError(f"unknown rollout engine {name!r}; known engines: {', '.join(ENGINES)}")
