"""Student/teacher models: plain descriptions (ModelSpec) and megatron-core GPTModel builders."""
from megatron_tip.models.builder import build_gpt_model
from megatron_tip.models.spec import check_model_parallel
from megatron_tip.models.spec import ModelSpec

__all__ = ["ModelSpec", "build_gpt_model", "check_model_parallel"]
