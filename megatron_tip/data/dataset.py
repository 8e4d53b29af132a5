"""Prompts in: the ``data`` config section and a tokenized, deterministically ordered prompt set.

``PromptDataset`` formats and tokenizes every prompt once and hands out a deterministic order:
step s of a run always sees the same prompts, so a resumed run continues exactly where the
interrupted one stopped.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from megatron_tip.data.config import DataConfig  # noqa: F401 (re-export: the section's old import path)
from megatron_tip.data.jsonl import numbered_problems
from megatron_tip.seeding import PROMPT_ORDER, derive_seed


@dataclass
class Prompt:
    problem: str
    answer: str
    ids: list[int]


class PromptDataset:
    """Tokenized prompts with a seeded, epoch-wise shuffled order."""

    def __init__(self, path: str, *, encode: Callable[[str], list[int]], max_prompt_len: int,
                 seed: int) -> None:
        self.prompts: list[Prompt] = []
        for n, row in numbered_problems(path):
            ids = encode(str(row["problem"]))
            if len(ids) > max_prompt_len:
                raise ValueError(f"{path}:{n}: prompt has {len(ids)} tokens, more than "
                                 f"data.max_prompt_len={max_prompt_len}")
            self.prompts.append(Prompt(str(row["problem"]), str(row["answer"]), ids))
        self.seed = seed
        self._orders: dict[int, list[int]] = {}

    def __len__(self) -> int:
        return len(self.prompts)

    def batch(self, step: int, *, size: int) -> list[Prompt]:
        """The ``size`` prompts of global step ``step`` (0-based), identical on every rank."""
        out = []
        for k in range(step * size, (step + 1) * size):
            epoch, pos = divmod(k, len(self.prompts))
            out.append(self.prompts[self._order(epoch)[pos]])
        return out

    def _order(self, epoch: int) -> list[int]:
        """The permutation of ``epoch`` (cached: a batch spans at most two epochs, so two are kept)."""
        if epoch not in self._orders:
            g = torch.Generator(device="cpu").manual_seed(derive_seed(self.seed, PROMPT_ORDER, epoch))
            self._orders = {e: o for e, o in self._orders.items() if e >= epoch - 1}
            self._orders[epoch] = torch.randperm(len(self.prompts), generator=g, device="cpu").tolist()  # host-side
        return self._orders[epoch]
