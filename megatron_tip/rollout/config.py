"""The ``rollout`` config section: which engine samples and how (validated at load time)."""
from __future__ import annotations

from dataclasses import dataclass

from megatron_tip.rollout.base import SamplingParams
from megatron_tip.validation import at_least, in_range, one_of

ENGINES = ("megatron", "vllm")


@dataclass
class RolloutConfig:
    engine: str = "megatron"  # megatron | vllm
    samples_per_prompt: int = 4
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64
    vllm_gpu_memory_utilization: float = 0.4

    def __post_init__(self) -> None:
        one_of("engine", self.engine, ENGINES)
        at_least("samples_per_prompt", self.samples_per_prompt, 1)
        at_least("temperature", self.temperature, 0.0)
        in_range("top_p", self.top_p, 0.0, 1.0, low_open=True)
        at_least("max_new_tokens", self.max_new_tokens, 1)
        in_range("vllm_gpu_memory_utilization", self.vllm_gpu_memory_utilization, 0.0, 1.0, low_open=True)

    def sampling(self, *, seed: int, stop_token_ids: tuple[int, ...]) -> SamplingParams:
        """The training rollouts' SamplingParams."""
        return SamplingParams(n=self.samples_per_prompt, temperature=self.temperature, top_p=self.top_p,
                              max_new_tokens=self.max_new_tokens, seed=seed, stop_token_ids=stop_token_ids)
