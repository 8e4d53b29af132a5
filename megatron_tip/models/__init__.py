"""Student/teacher models: plain descriptions (ModelSpec) and megatron-core GPTModel builders.

Names are imported on first use (PEP 562), so the torch-free ``models.config`` imports alone.
"""
from megatron_tip.lazy_exports import lazy_exports

_EXPORTS = {"ModelSpec": "spec", "build_gpt_model": "builder", "check_model_parallel": "spec"}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
