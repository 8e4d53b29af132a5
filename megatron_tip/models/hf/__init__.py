"""Hugging Face side of the models: config <-> ModelSpec (families), name map (mapping), weight files (weights).

Needed at training time (loading HF checkpoints, syncing weights into vLLM) and by the converter.
"""
from megatron_tip.models.hf.families import (
    FAMILIES, family_for_hf_config, hf_config_dict_from_spec, hf_config_from_spec, spec_from_hf_config,
)
from megatron_tip.models.hf.mapping import (
    RULES, canonical_to_hf, fuse_gate_up, fuse_qkv, hf_to_canonical, split_gate_up, split_qkv,
)
from megatron_tip.models.hf.weights import HFCheckpointReader, load_hf_weights, save_hf_safetensors

__all__ = [
    "FAMILIES", "HFCheckpointReader", "RULES", "canonical_to_hf", "family_for_hf_config", "fuse_gate_up",
    "fuse_qkv", "hf_config_dict_from_spec", "hf_config_from_spec", "hf_to_canonical", "load_hf_weights",
    "save_hf_safetensors", "spec_from_hf_config", "split_gate_up", "split_qkv",
]
