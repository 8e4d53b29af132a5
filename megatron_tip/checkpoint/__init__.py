"""Checkpoints and run directories: the only package that knows their on-disk format."""
from megatron_tip.checkpoint.layout import (
    CheckpointExistsError, complete_checkpoints, is_hf_dir, is_megatron_checkpoint, read_checkpoint_info,
    read_spec, tokenizer_dir,
)
from megatron_tip.checkpoint.model import load_megatron_checkpoint, load_weights, save_megatron_checkpoint

__all__ = [
    "CheckpointExistsError", "complete_checkpoints", "is_hf_dir", "is_megatron_checkpoint",
    "load_megatron_checkpoint", "load_weights", "read_checkpoint_info", "read_spec",
    "save_megatron_checkpoint", "tokenizer_dir",
]
