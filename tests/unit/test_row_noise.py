"""RowNoise + sample_next(noise=...) draw exactly torch.multinomial's per-row tokens (issue #27)."""
import pytest
import torch

from megatron_tip.rollout.megatron_engine import RowNoise, sample_next


@pytest.mark.parametrize("top_p,budget", [(1.0, 1 << 24), (0.9, 1 << 24), (1.0, 3 * 5 * 50)])
def test_noise_sampling_matches_per_row_multinomial(top_p, budget):
    b, v, draws = 5, 50, 12
    starts = [0, 0, 2, 3, 5]  # rows start drawing at different steps (longer prompts)
    logits = torch.randn(draws + max(starts), b, v, generator=torch.Generator().manual_seed(0)) * 3
    ref_gens = [torch.Generator().manual_seed(100 + r) for r in range(b)]
    noise = RowNoise([torch.Generator().manual_seed(100 + r) for r in range(b)], vocab=v, max_draws=draws,
                     device="cpu", budget=budget)
    if budget < 1 << 24:
        assert noise.block == 3  # several refills per row
    for t in range(logits.shape[0]):
        rows = torch.tensor([r for r in range(b) if starts[r] <= t < starts[r] + draws])
        ref = sample_next(logits[t, rows], temperature=0.7, top_p=top_p,
                          generators=[ref_gens[r] for r in rows.tolist()])
        got = sample_next(logits[t, rows], temperature=0.7, top_p=top_p, generators=[],
                          noise=noise.take(rows, t - torch.tensor(starts)[rows]))
        assert torch.equal(ref, got), t
