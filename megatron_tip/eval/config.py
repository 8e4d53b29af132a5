"""The ``eval`` config section: the held-out prompts of a training run (torch-free)."""
from __future__ import annotations

from dataclasses import dataclass

from megatron_tip.validation import at_least


@dataclass
class EvalConfig:
    """Held-out prompts (JSONL) the student is scored on before and after training (greedy and T=1.0)."""

    prompts: str = ""  # empty: no held-out evaluation
    limit: int = 64  # first N prompts
    before: bool = True  # also evaluate before training (sweeps skip the repeated baseline)

    def __post_init__(self) -> None:
        at_least("limit", self.limit, 1)
