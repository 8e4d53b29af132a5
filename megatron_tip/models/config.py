"""The ``student`` / ``teacher`` config sections: where a model's weights come from and in what dtype."""
from __future__ import annotations

from dataclasses import dataclass

from megatron_tip.validation import one_of

DTYPES = ("float32", "bfloat16")


@dataclass
class ModelConfig:
    """An HF checkpoint dir or a megatron checkpoint dir, and the parameter dtype to build it in."""

    path: str = ""
    dtype: str = "float32"  # params dtype: float32 | bfloat16

    def __post_init__(self) -> None:
        one_of("dtype", self.dtype, DTYPES)

    @property
    def torch_dtype(self):
        import torch

        return {"float32": torch.float32, "bfloat16": torch.bfloat16}[self.dtype]
