"""The ``rollout`` config section: which engine samples and how (validated at load time)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

from megatron_tip.validation import at_least, in_range, one_of

if TYPE_CHECKING:  # annotations only; sampling() imports it (rollout.base imports torch)
    from megatron_tip.rollout.base import SamplingParams

ENGINES = ("megatron", "vllm")
SLEEP_LEVELS = (0, 1, 2)  # vLLM sleep mode: 0 never sleep; 1 offload weights, free KV cache; 2 discard both


@dataclass
class RolloutConfig:
    engine: str = "megatron"  # megatron | vllm
    samples_per_prompt: int = 4
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64
    # megatron engine: rollouts decoded together in one KV-cache batch; 0 = all of a step's rollouts
    # on this rank at once (the planner reports the KV cache this takes; lower it when it does not fit)
    micro_batch_size: int = 0
    vllm_gpu_memory_utilization: float = 0.4
    # vLLM sleep mode between rollouts and training (CUDA only; engine=vllm only): 0 off,
    # 1 offload weights to CPU + free the KV cache, 2 discard both (each step's sync reloads them)
    vllm_sleep_level: int = 0
    # the rollout engines' own tensor parallelism; 0 = the student's (parallel.tensor_parallel)
    tensor_parallel: int = 0
    # vLLM without CUDA graphs; null = auto (true on CPU, false on CUDA)
    vllm_enforce_eager: Optional[bool] = None

    def __post_init__(self) -> None:
        one_of("engine", self.engine, ENGINES)
        at_least("samples_per_prompt", self.samples_per_prompt, 1)
        at_least("temperature", self.temperature, 0.0)
        in_range("top_p", self.top_p, 0.0, 1.0, low_open=True)
        at_least("max_new_tokens", self.max_new_tokens, 1)
        at_least("micro_batch_size", self.micro_batch_size, 0)
        in_range("vllm_gpu_memory_utilization", self.vllm_gpu_memory_utilization, 0.0, 1.0, low_open=True)
        one_of("vllm_sleep_level", self.vllm_sleep_level, SLEEP_LEVELS)
        at_least("tensor_parallel", self.tensor_parallel, 0)
        if self.temperature == 0 and self.samples_per_prompt > 1:
            raise ValueError(f"temperature=0 (greedy) with samples_per_prompt={self.samples_per_prompt} gives "
                             f"identical samples (vLLM refuses it): set samples_per_prompt=1 or temperature>0")

    def check_parallel(self, *, pipeline_parallel: int, tensor_parallel: int) -> None:
        """Engine constraints on the student's layout, checked when the run config is composed."""
        if self.engine == "vllm":
            check_vllm_pipeline(pipeline_parallel)
        tp = self.tensor_parallel
        if tp in (0, tensor_parallel):
            return
        if self.engine == "megatron":
            raise ValueError(f"rollout.tensor_parallel={tp}: rollout.engine=megatron samples with the student "
                             f"itself, in its layout (parallel.tensor_parallel={tensor_parallel}); set 0")
        if tp > tensor_parallel or tensor_parallel % tp:
            raise ValueError(f"rollout.tensor_parallel={tp} must divide parallel.tensor_parallel={tensor_parallel} "
                             f"(each student TP group holds a whole number of engines)")

    def engine_tensor_parallel(self, *, student_tensor_parallel: int) -> int:
        """The rollout engines' TP size: ``tensor_parallel``, or the student's when 0."""
        return self.tensor_parallel or student_tensor_parallel

    def enforce_eager(self, *, cuda: bool) -> bool:
        """vLLM without CUDA graphs: ``vllm_enforce_eager``, or (null) true on CPU, false on CUDA."""
        return (not cuda) if self.vllm_enforce_eager is None else self.vllm_enforce_eager

    def sampling(self, *, seed: int, stop_token_ids: tuple[int, ...]) -> SamplingParams:
        """The training rollouts' SamplingParams."""
        from megatron_tip.rollout.base import SamplingParams

        return SamplingParams(n=self.samples_per_prompt, temperature=self.temperature, top_p=self.top_p,
                              max_new_tokens=self.max_new_tokens, seed=seed, stop_token_ids=stop_token_ids)


def check_vllm_pipeline(pipeline_parallel: int) -> None:
    """ValueError unless vLLM can run with ``pipeline_parallel`` stages (1: it holds the whole model in
    each TP group). The one source of this refusal: the config (at load) and the colocated engine use it."""
    if pipeline_parallel > 1:
        raise ValueError(f"rollout.engine=vllm needs parallel.pipeline_parallel=1 (got {pipeline_parallel}): "
                         f"vLLM holds the whole model in each TP group; use rollout.engine=megatron with PP>1")
