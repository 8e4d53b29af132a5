"""The step's token layout: token-budget micro-batches cover every position of the padded view once."""
import itertools
import subprocess
import sys

import pytest
import torch

from megatron_tip.rollout.base import Rollout
from megatron_tip.rollout.layout import PAD_TOLERANCE, microbatches, pad_rollouts, processed_tokens, token_bins
from tests.helpers.paths import REPO


def _rollouts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [Rollout(prompt_index=i, prompt_ids=torch.randint(4, 50, (3,), generator=g).tolist(),
                    response_ids=torch.randint(4, 50, (n,), generator=g).tolist()) for i, n in enumerate(lengths)]


def test_token_bins_are_length_sorted_consecutive_and_within_budget():
    lengths = [5, 40, 7, 40, 3, 22, 21, 9]
    bins = token_bins(lengths, max_tokens=45)
    flat = list(itertools.chain(*bins))
    assert sorted(flat) == list(range(len(lengths)))  # every rollout exactly once
    assert [lengths[i] for i in flat] == sorted(lengths, reverse=True)  # longest first
    assert flat[:2] == [1, 3]  # ties keep rollout order
    def fits(rows):  # within budget and within the padding tolerance
        area = len(rows) * max(lengths[i] for i in rows)
        return area <= 45 and area <= (1 + PAD_TOLERANCE) * sum(lengths[i] for i in rows)

    assert all(fits(b) for b in bins)
    for b, nxt in zip(bins, bins[1:]):  # no bin could have taken the next rollout
        assert not fits(b + nxt[:1]), (b, nxt)
    assert [[lengths[i] for i in b] for b in bins] == [[40], [40], [22, 21], [9], [7], [5], [3]]
    with pytest.raises(ValueError, match="train.max_tokens_per_microbatch=30"):
        token_bins(lengths, max_tokens=30)


def test_padding_stays_within_the_tolerance_on_a_long_tailed_mix():
    g = torch.Generator().manual_seed(0)
    lengths = torch.exp(5 + 0.6 * torch.randn(128, generator=g)).long().clamp(16, 1024).tolist()
    lengths[:13] = [1024] * 13
    bins = token_bins(lengths, max_tokens=8 * 1024)
    processed = sum(len(b) * lengths[b[0]] for b in bins)
    assert processed <= (1 + PAD_TOLERANCE) * sum(lengths)
    assert len(bins) < len(lengths) // 2  # and bins still hold several rows on average


@pytest.mark.parametrize("max_tokens", [0, 60, 200])
def test_microbatches_map_back_to_every_padded_position_once(max_tokens):
    batch = pad_rollouts(_rollouts([40, 2, 17, 5, 33, 1, 8]), pad_id=0)
    mbs = microbatches(batch, size=3, max_tokens=max_tokens)
    seen = torch.zeros(batch.valid.shape, dtype=torch.long)
    for mb in mbs:
        rows, (b, s) = mb["rows"], mb["input_ids"].shape
        if max_tokens:
            assert b * s <= max_tokens and b == rows.numel()
            assert s == int(batch.lengths[rows].max())  # trimmed to its longest row
        for k in ("input_ids", "target_ids", "position_ids", "valid"):
            assert torch.equal(mb[k][: rows.numel()], getattr(batch, k)[rows, :s])
        assert not mb["valid"][rows.numel():].any()  # filler rows count nowhere
        seen[rows, :s] += 1
    assert (seen[batch.valid] == 1).all()  # every response position is scored exactly once
    assert (seen <= 1).all()
    if not max_tokens:  # fixed rows: one shape, rollout order
        assert len({tuple(mb["input_ids"].shape) for mb in mbs}) == 1
        assert torch.cat([mb["rows"] for mb in mbs]).tolist() == list(range(7))


def test_budget_layout_computes_fewer_positions_than_padding():
    batch = pad_rollouts(_rollouts([200] + [20] * 15), pad_id=0)
    padded = processed_tokens(microbatches(batch, size=4))
    budget = processed_tokens(microbatches(batch, size=4, max_tokens=400))
    assert padded == 16 * 203  # every row at the step width (3 + 200 tokens)
    assert budget == 202 + 15 * 22  # the long row alone, the short ones at their own width


def test_budget_below_the_longest_sequence_fails_at_load_with_one_line():
    cfg = REPO / "examples" / "configs" / "tiny_cpu.yaml"  # max_prompt_len 32 + max_new_tokens 48
    out = subprocess.run([sys.executable, "-m", "megatron_tip.train", "--config", str(cfg),
                          "train.max_tokens_per_microbatch=79"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip() == (  # one line, before any model loads
        "error: train.max_tokens_per_microbatch=79 is smaller than the longest allowed sequence "
        "data.max_prompt_len + rollout.max_new_tokens = 80")
