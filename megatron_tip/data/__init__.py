"""Data in: problem files (the one JSONL reader), prompt formatting, the tokenized prompt set.

Names are imported on first use (PEP 562), so the torch-free ``data.config`` imports alone.
"""
from megatron_tip.data.config import DataConfig
from megatron_tip.lazy_exports import lazy_exports

_EXPORTS = {"Prompt": "dataset", "PromptDataset": "dataset", "read_jsonl": "jsonl", "read_problems": "jsonl"}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = ["DataConfig", *_EXPORTS]
