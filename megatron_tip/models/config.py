"""The ``student`` / ``teacher`` config sections: where a model's weights come from, its dtype, its
layer implementation and (student only) activation recomputation."""
from __future__ import annotations

from dataclasses import dataclass

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
