"""Expected tokens of a step and the padding factor of its micro-batch layout (issue #22).

The memory plan stays the worst case (every response at ``rollout.max_new_tokens``), since that
is what a step can hit. This adds what a typical step computes, from a stated mean response
length or a length histogram:

- real positions: rollouts x (prompt + mean response - 1) per data-parallel rank (the prompt at
  ``data.max_prompt_len``: conservative);
- padded layout (``train.max_tokens_per_microbatch=0``): every rollout at the step's longest
  sequence, taken as the longest length the lengths allow (the cap for a stated mean; a step of
  dozens of rollouts almost always holds one of the longest);
- token-budget layout: at most ``1 + PAD_TOLERANCE`` times the real positions (``rollout.layout``
  guarantees it per micro-batch, whatever the lengths) with ``train.packing=bins``; exactly the
  real positions with ``train.packing=thd`` (no pad position).

padding factor = computed / real positions, the figure the trainer logs per step (``padding_factor``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

from megatron_tip.rollout.layout import PAD_TOLERANCE

ASSUMED_MEAN_SHARE = 0.3  # without a stated length: the paper workload's shape (~2,500 of 8,192)


@dataclass(frozen=True)
class TokenPlan:
    rollouts: int  # per data-parallel rank
    prompt_len: int
    response_cap: int
    mean_response: float
    longest_response: int  # the padded layout's width (minus the prompt)
    source: str  # where the lengths come from
    micro_batch: int
    max_tokens: int  # 0: fixed rows (padded)
    packing: str = "bins"  # with a budget: bins (trimmed rows) or thd (packed rows, no padding)

    def positions(self, response: float) -> float:
        """Input positions of the step's rollouts at this response length (the last token predicts nothing)."""
        return self.rollouts * (self.prompt_len + response - 1)

    @property
    def real(self) -> float:
        return self.positions(self.mean_response)

    @property
    def padded(self) -> float:  # the padded view is as wide as the longest whole sequence
        return self.rollouts * (self.prompt_len + self.longest_response)

    @property
    def thd(self) -> bool:
        return bool(self.max_tokens) and self.packing == "thd"

    @property
    def packed_bound(self) -> float:
        return self.real if self.thd else (1 + PAD_TOLERANCE) * self.real

    @property
    def worst(self) -> float:  # every response at the cap (what the memory plan assumes)
        return self.rollouts * (self.prompt_len + self.response_cap)

    @property
    def padding_factor(self) -> float:
        """Computed / real positions in the config's layout (an upper bound with a token budget)."""
        return (self.packed_bound if self.max_tokens else self.padded) / self.real

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "mean_response": self.mean_response, "real": self.real,
                "padded": self.padded, "packed_bound": self.packed_bound, "worst": self.worst,
                "layout": ("THD packed" if self.thd else "token budget") if self.max_tokens else "padded", "padding_factor": self.padding_factor}


def parse_histogram(text: str) -> list[tuple[int, float]]:
    """``"256:0.5,1024:0.4,8192:0.1"`` -> [(length, share), ...] (shares need not sum to 1)."""
    out = []
    for item in text.split(","):
        length, sep, share = item.partition(":")
        try:
            pair = (int(length), float(share))
        except ValueError:
            pair = None
        if not sep or pair is None or pair[0] < 1 or not math.isfinite(pair[1]) or pair[1] < 0:
            raise ValueError(f"--response-histogram {text!r}: expected LENGTH:SHARE,... with lengths >= 1 "
                             f"and shares >= 0, got {item!r}")
        out.append(pair)
    if not sum(s for _, s in out) > 0:
        raise ValueError(f"--response-histogram {text!r}: the shares sum to 0")
    return out


def plan_tokens(cfg: Any, *, dp: int, mean_response: Optional[float] = None,
                histogram: Optional[list[tuple[int, float]]] = None) -> TokenPlan:
    """The step's expected tokens per data-parallel rank for RunConfig ``cfg``.

    ``mean_response`` or ``histogram`` (response length, share) state the lengths; with neither,
    the mean is assumed at ASSUMED_MEAN_SHARE of the cap (and the source says so).
    """
    cap = int(cfg.rollout.max_new_tokens)
    if histogram:
        if max(n for n, _ in histogram) > cap:
            raise ValueError(f"--response-histogram: a length above rollout.max_new_tokens={cap}")
        total = sum(s for _, s in histogram)
        mean = sum(n * s for n, s in histogram) / total
        longest, source = max(n for n, s in histogram if s > 0), "length histogram"
    elif mean_response is not None:
        if not 1 <= mean_response <= cap:
            raise ValueError(f"--mean-response-len={mean_response:g}: must be in [1, rollout.max_new_tokens={cap}]")
        mean, longest, source = float(mean_response), cap, "stated mean"
    else:
        mean, longest = ASSUMED_MEAN_SHARE * cap, cap
        source = f"assumed mean {ASSUMED_MEAN_SHARE:g} x cap; state yours: --mean-response-len / --response-histogram"
    return TokenPlan(rollouts=int(cfg.train.prompts_per_step) // dp * int(cfg.rollout.samples_per_prompt),
                     prompt_len=int(cfg.data.max_prompt_len), response_cap=cap, mean_response=mean,
                     longest_response=longest, source=source, micro_batch=int(cfg.train.micro_batch_size),
                     max_tokens=int(cfg.train.max_tokens_per_microbatch), packing=str(cfg.train.packing))


def format_tokens(tp: TokenPlan) -> list[str]:
    """The report's lines for ``tp``."""
    k = lambda n: f"{n / 1e3:,.1f}k"  # noqa: E731
    what = "THD packing, train.packing=thd" if tp.thd else "token budget"
    mode = (f"{what} ({tp.max_tokens:,} per micro-batch, >= {math.ceil(tp.packed_bound / tp.max_tokens)} "
            f"micro-batch(es))" if tp.max_tokens else f"padded ({tp.micro_batch} row(s) at the step's longest)")
    rows_tokens = tp.micro_batch * (tp.prompt_len + tp.response_cap)  # fixed rows' worst-case micro-batch
    lines = [f"Tokens per step and DP rank (mean response {tp.mean_response:,.0f} of {tp.response_cap:,}: {tp.source})",
            f"  real positions {k(tp.real)}; padded layout {k(tp.padded)} ({tp.padded / tp.real:.2f}x); "
            f"token-budget bins <= {k((1 + PAD_TOLERANCE) * tp.real)} (<= {1 + PAD_TOLERANCE:.2f}x), THD packed "
            f"{k(tp.real)} (1.00x); worst case {k(tp.worst)}",
            f"  this config: {mode} -> padding factor {'<= ' if tp.max_tokens and not tp.thd else ''}"
            f"{tp.padding_factor:.2f}"
            + ("" if tp.max_tokens else f" (train.max_tokens_per_microbatch={rows_tokens} packs by token "
                                         f"budget, same worst-case micro-batch)")]
    if tp.max_tokens > rows_tokens:  # the memory plan sizes a micro-batch as micro_batch_size full rows
        lines.append(f"note: the memory plan sizes micro-batches at train.micro_batch_size x sequence = {rows_tokens:,} "
                     f"tokens, below the budget {tp.max_tokens:,}: raise train.micro_batch_size to "
                     f"{math.ceil(tp.max_tokens / (tp.prompt_len + tp.response_cap))} for the planner to cover it")
    return lines
