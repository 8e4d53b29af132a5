"""HF <-> megatron-core conversion for Llama-3, Qwen2/2.5 and Qwen3 (declarative name map)."""
from megatron_tip.convert.checkpoint import (
    CheckpointExistsError, load_megatron_checkpoint, read_checkpoint_info, save_megatron_checkpoint,
)
from megatron_tip.convert.families import (
    FAMILIES, family_for_hf_config, hf_config_from_spec, spec_from_hf_config,
)
from megatron_tip.convert.hf_io import HFCheckpointReader, load_hf_weights, save_hf_safetensors
from megatron_tip.convert.mapping import (
    RULES, canonical_to_hf, fuse_gate_up, fuse_qkv, hf_to_canonical, split_gate_up, split_qkv,
)
from megatron_tip.convert.run import hf_to_megatron, megatron_to_hf

__all__ = [
    "CheckpointExistsError", "FAMILIES", "HFCheckpointReader", "RULES", "canonical_to_hf",
    "family_for_hf_config", "fuse_gate_up", "fuse_qkv", "hf_config_from_spec", "hf_to_canonical",
    "hf_to_megatron", "load_hf_weights", "load_megatron_checkpoint", "megatron_to_hf",
    "read_checkpoint_info", "save_hf_safetensors", "save_megatron_checkpoint", "spec_from_hf_config",
    "split_gate_up", "split_qkv",
]
