"""HF <-> megatron-core checkpoint conversion: ``python -m megatron_tip.convert`` (see __main__).

The name map and HF file I/O live with the models (``megatron_tip.models.hf``), the checkpoint
format in ``megatron_tip.checkpoint``; this package only runs conversions and checks them.
"""
from megatron_tip.convert.run import hf_to_megatron, megatron_to_hf

__all__ = ["hf_to_megatron", "megatron_to_hf"]
