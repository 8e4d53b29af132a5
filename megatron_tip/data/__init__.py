"""Data in: problem files (the one JSONL reader), prompt formatting, the tokenized prompt set."""
from megatron_tip.data.dataset import DataConfig, Prompt, PromptDataset
from megatron_tip.data.jsonl import read_jsonl, read_problems

__all__ = ["DataConfig", "Prompt", "PromptDataset", "read_jsonl", "read_problems"]
