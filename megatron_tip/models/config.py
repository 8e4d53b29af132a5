"""The ``student`` / ``teacher`` config sections: where a model's weights come from, its dtype, its
layer implementation and (student only) activation recomputation."""
from __future__ import annotations

from dataclasses import dataclass, field

from megatron_tip.validation import at_least, one_of

DTYPES = ("float32", "bfloat16")
RECOMPUTE = ("none", "selective", "full")
RECOMPUTE_METHODS = ("uniform", "block")
IMPLS = ("auto", "local", "transformer_engine")


@dataclass
class ModelConfig:
    """An HF checkpoint dir or a megatron checkpoint dir, and how to build it.

    recompute_granularity: megatron activation recomputation (student only; the teacher keeps no
      activations): "selective" recomputes core attention, "full" whole layers — with
      recompute_method "uniform" (groups of recompute_num_layers layers) or "block" (the first
      recompute_num_layers layers of each pipeline stage).
    transformer_impl: "auto" = Transformer Engine's layer spec when CUDA and transformer-engine are
      present, else megatron's local (torch) spec; "local" / "transformer_engine" force one.
    """

    path: str = ""
    dtype: str = "float32"  # params dtype: float32 | bfloat16
    recompute_granularity: str = "none"
    recompute_method: str = "uniform"
    recompute_num_layers: int = 1
    transformer_impl: str = "auto"

    def __post_init__(self) -> None:
        one_of("dtype", self.dtype, DTYPES)
        one_of("recompute_granularity", self.recompute_granularity, RECOMPUTE)
        one_of("recompute_method", self.recompute_method, RECOMPUTE_METHODS)
        at_least("recompute_num_layers", self.recompute_num_layers, 1)
        one_of("transformer_impl", self.transformer_impl, IMPLS)

    @property
    def torch_dtype(self):
        import torch

        return {"float32": torch.float32, "bfloat16": torch.bfloat16}[self.dtype]

    def megatron_overrides(self) -> dict:
        """TransformerConfig fields for the memory settings, passed to megatron-core as they are."""
        if self.recompute_granularity == "none":
            return {}
        if self.recompute_granularity == "selective":
            return {"recompute_granularity": "selective"}
        return {"recompute_granularity": "full", "recompute_method": self.recompute_method,
                "recompute_num_layers": self.recompute_num_layers}


@dataclass
class RoleParallelConfig:
    """A role's own model-parallel sizes; 0 = the same as the student's (``parallel``)."""

    tensor_parallel: int = 0
    pipeline_parallel: int = 0

    def __post_init__(self) -> None:
        at_least("tensor_parallel", self.tensor_parallel, 0)
        at_least("pipeline_parallel", self.pipeline_parallel, 0)

    def resolved(self, *, tensor_parallel: int, pipeline_parallel: int) -> tuple[int, int]:
        """(TP, PP) of the role, the student's ``tensor_parallel``/``pipeline_parallel`` where unset."""
        return (self.tensor_parallel or tensor_parallel, self.pipeline_parallel or pipeline_parallel)


@dataclass
class TeacherConfig(ModelConfig):
    """The ``teacher`` section: a ModelConfig plus its own layout and host offload.

    parallel: the teacher's TP/PP on the same ranks as the student (time-shared); unset = the student's.
    offload: keep the teacher's weights in host memory between scoring passes.
    """

    parallel: RoleParallelConfig = field(default_factory=RoleParallelConfig)
    offload: bool = False

    @property
    def own_layout(self) -> bool:
        return bool(self.parallel.tensor_parallel or self.parallel.pipeline_parallel)
