"""Checkpoints and run directories: the only package that knows their on-disk format.

Names are imported on first use (PEP 562), so the torch-free ``checkpoint.config`` imports alone.
"""
from megatron_tip.lazy_exports import lazy_exports

_EXPORTS = {
    **dict.fromkeys(("CheckpointExistsError", "is_hf_dir", "is_megatron_checkpoint", "read_checkpoint_info",
                     "read_spec", "tokenizer_dir"), "layout"),
    **dict.fromkeys(("load_megatron_checkpoint", "load_weights", "save_megatron_checkpoint"), "model"),
    "UnsafeCheckpointError": "safe_load",
    "complete_checkpoints": "training",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
