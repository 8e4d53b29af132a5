"""The ``data`` config section: the prompts file and how prompts are formatted (torch-free)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megatron_tip.validation import at_least


@dataclass
class DataConfig:
    """Prompts: a JSONL file with `problem` and `answer` fields."""

    prompts: str = ""
    # auto: the student's prompt_template.txt, else its chat template, else plain text;
    # chat | plain | a literal template containing {problem} (megatron_tip.data.prompts)
    prompt_format: str = "auto"
    enable_thinking: Optional[bool] = None  # Qwen3 chat templates: thinking on/off
    max_prompt_len: int = 2048

    def __post_init__(self) -> None:
        at_least("max_prompt_len", self.max_prompt_len, 1)
