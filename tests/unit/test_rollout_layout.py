"""The step's token layout: token-budget bins and THD-packed rows cover every position of the padded view once."""
import itertools
import subprocess
import sys

import pytest
import torch

from megatron_tip.rollout.base import Rollout
from megatron_tip.rollout.layout import (
    PAD_TOLERANCE,
    first_fit_decreasing,
    from_padded,
    microbatches,
    packed_microbatches,
    pad_rollouts,
    processed_tokens,
    step_microbatches,
    to_padded,
    token_bins,
)
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


def test_first_fit_decreasing_fills_rows_within_the_budget():
    lengths = [5, 40, 7, 40, 3, 22, 21, 9]
    bins = first_fit_decreasing(lengths, max_tokens=50)
    assert sorted(itertools.chain(*bins)) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 50 for b in bins)
    # longest first, each into the first row with room: 40+9, 40+7+3, 22+21+5
    assert [[lengths[i] for i in b] for b in bins] == [[40, 9], [40, 7, 3], [22, 21, 5]]
    assert len(bins) == -(-sum(lengths) // 50)  # as few rows as the budget allows here
    with pytest.raises(ValueError, match="train.max_tokens_per_microbatch=30"):
        first_fit_decreasing(lengths, max_tokens=30)


def _segment_causal_sum(x, cu):
    """Reference 'attention that stops at cu_seqlens' on a packed row: prefix sums restarting per segment."""
    return torch.cat([x[a:b].cumsum(0) for a, b in itertools.pairwise(cu)])


def test_thd_layout_matches_the_padded_view():
    batch = pad_rollouts(_rollouts([40, 2, 17, 5, 33, 1, 8]), pad_id=0)
    mbs = packed_microbatches(batch, max_tokens=60)
    assert processed_tokens(mbs) == int(batch.lengths.sum())  # no pad position computed
    seen = torch.zeros(batch.valid.shape, dtype=torch.long)
    causal_padded = (batch.input_ids * (batch.position_ids + 1)).cumsum(1)  # per-row prefix sums
    for mb in mbs:
        cu, rows = mb["cu_seqlens"], mb["rows"]
        assert mb["input_ids"].shape == (1, int(cu[-1])) and cu.dtype == torch.int32 and int(cu[0]) == 0
        assert int(cu[-1]) <= 60 and mb["max_seqlen"] == int(batch.lengths[rows].max())
        assert torch.equal(cu.diff().long(), batch.lengths[rows])  # one segment per rollout, in row order
        for j, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
            assert mb["position_ids"][0, a:b].tolist() == list(range(b - a))  # positions restart at 0
            assert (mb["src_rows"][0, a:b] == rows[j]).all()
            for k in ("input_ids", "target_ids", "valid"):
                assert torch.equal(mb[k][0, a:b], getattr(batch, k)[rows[j], : b - a])
        for k in ("input_ids", "target_ids", "valid", "position_ids"):  # the map back, both ways
            assert torch.equal(from_padded(mb, getattr(batch, k)), mb[k])
        # a per-sequence causal computation on the packed row lands where the padded one does
        packed = _segment_causal_sum((mb["input_ids"] * (mb["position_ids"] + 1))[0], cu.tolist())[None]
        out = torch.zeros_like(causal_padded)
        to_padded(mb, packed, out)
        keep = torch.zeros_like(batch.valid)
        to_padded(mb, torch.ones_like(mb["valid"]), keep)
        assert torch.equal(out[keep], causal_padded[keep])
        seen += keep.long()
    assert (seen[batch.valid] == 1).all() and (seen <= 1).all()  # every response position exactly once


def test_step_layout_selects_the_mode():
    batch = pad_rollouts(_rollouts([40, 2, 17]), pad_id=0)
    assert "cu_seqlens" in step_microbatches(batch, size=2, max_tokens=60, packing="thd")[0]
    assert "cu_seqlens" not in step_microbatches(batch, size=2, max_tokens=60, packing="bins")[0]
    assert "cu_seqlens" not in step_microbatches(batch, size=2, max_tokens=0, packing="thd")[0]


@pytest.mark.parametrize("args,message", [
    (["train.packing=thd", "train.max_tokens_per_microbatch=0"], ("error: train.packing=thd packs rollouts by token budget: set "
                             "train.max_tokens_per_microbatch > 0")),
    (["train.packing=thd", "train.max_tokens_per_microbatch=1280"],  # CPU: megatron's local spec
     ("error: train.packing=thd needs Transformer Engine's layer spec, but student.transformer_impl=auto builds "
      "megatron's local spec here (no CUDA or no transformer-engine), whose attention refuses packed sequences; "
      "use train.packing=bins")),
])
def test_thd_without_budget_or_te_fails_before_any_model_loads(tmp_path, args, message):
    cfg = REPO / "examples" / "configs" / "tiny_cpu.yaml"
    out = subprocess.run([sys.executable, "-m", "megatron_tip.train", "--config", str(cfg), *args,
                          f"run.out_dir={tmp_path}"], check=False, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert errors == [message]
    assert not list(tmp_path.glob("checkpoints*")) and not (tmp_path / "metrics.jsonl").exists()
