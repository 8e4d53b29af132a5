"""Inclusion probabilities of the entropy sampler and the inverse-inclusion weighted loss.

References are independent of the code under test: Monte-Carlo frequencies of the sampler
itself (Efraimidis–Spirakis keys + per-row top-k, the functions the policy uses) and float64
sums of per-token losses.
"""
import torch

from megatron_tip.loss import kept_reverse_kl_loss
from megatron_tip.selection import SelectionConfig, select_tokens
from megatron_tip.selection.inclusion import inclusion_probabilities, inverse_inclusion_weights
from megatron_tip.selection.policies import budget, per_row_topk_mask, sampling_keys


def _mc_frequencies(w: torch.Tensor, valid: torch.Tensor, k: torch.Tensor, draws: int, seed: int = 0):
    """Keep frequencies [B, S] of ``draws`` independent runs of the sampler (float64)."""
    g = torch.Generator().manual_seed(seed)
    B, S = w.shape
    wr, vr = w.repeat(draws, 1), valid.repeat(draws, 1)
    u = 1.0 - torch.rand(wr.shape, generator=g, dtype=torch.float64)
    mask = per_row_topk_mask(sampling_keys(wr, vr, u), vr, k.repeat(draws))
    return mask.view(draws, B, S).double().mean(0), mask.view(draws, B, S)


def _toy_like_h(B: int, S: int, seed: int) -> torch.Tensor:
    """Heavy-tailed normalized entropies like the toy's (most near 0, a few up to ~0.3)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(B, S, generator=g, dtype=torch.float64) ** 4 * 0.3 + 1e-4)


def test_exact_inclusion_matches_the_sampler():
    h = _toy_like_h(3, 25, seed=1)
    valid = torch.ones_like(h, dtype=torch.bool)
    valid[1, 18:] = False                      # a shorter rollout
    h[2, :3] = 0.0                             # zero entropy: drawn only after every positive one
    k = torch.tensor([12, 4, 22])              # row 2: k = 22 = #positive, so h = 0 is never kept
    pi = inclusion_probabilities(h, valid, k)
    freq, _ = _mc_frequencies(h, valid, k, draws=40_000)
    se = (freq * (1 - freq) / 40_000).sqrt()
    assert ((pi - freq).abs() <= 4.5 * se + 2e-3).all(), float(((pi - freq).abs() / (se + 1e-9)).max())
    torch.testing.assert_close(pi.sum(1), k.double(), atol=1e-3, rtol=0)
    assert not pi[~valid].any() and not pi[2, :3].any() and torch.allclose(pi[2, 3:], torch.ones(22, dtype=torch.float64))


def test_zero_weights_share_the_draws_left_over():
    h = torch.tensor([[0.5, 0.2, 0.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    pi = inclusion_probabilities(h, torch.ones_like(h, dtype=torch.bool), torch.tensor([4]))
    torch.testing.assert_close(pi, torch.tensor([[1.0, 1.0, 0.5, 0.5, 0.5, 0.5]], dtype=torch.float64))


def test_rosen_approximation_on_long_rows():
    """Rows longer than exact_max_len use Rosén's approximation: within Monte-Carlo noise at m = 400."""
    h = _toy_like_h(2, 400, seed=2)
    valid = torch.ones_like(h, dtype=torch.bool)
    k = torch.tensor([200, 40])
    pi = inclusion_probabilities(h, valid, k, exact_max_len=64)
    freq, _ = _mc_frequencies(h, valid, k, draws=10_000, seed=3)
    se = (freq * (1 - freq) / 10_000).sqrt()
    torch.testing.assert_close(pi.sum(1), k.double(), atol=1e-6, rtol=0)
    assert (pi - freq).abs().max() < 0.015
    assert ((pi - freq).abs() <= 5 * se + 3e-3).float().mean() > 0.99


def test_equal_weights_and_full_budget_are_exact():
    w = torch.full((2, 30), 0.2, dtype=torch.float64)
    valid = torch.ones_like(w, dtype=torch.bool)
    for exact_max_len in (64, 8):  # exact integral, then Rosén
        pi = inclusion_probabilities(w, valid, torch.tensor([6, 30]), exact_max_len=exact_max_len)
        torch.testing.assert_close(pi[0], torch.full((30,), 0.2, dtype=torch.float64), atol=1e-6, rtol=0)
        torch.testing.assert_close(pi[1], torch.ones(30, dtype=torch.float64))


def test_inverse_inclusion_loss_is_unbiased_for_the_all_token_mean():
    """E[Σ_kept w·KL / |T|] = (1/N) Σ_all KL over many sampler draws; the unweighted mean is biased."""
    B, S, draws = 4, 20, 40_000
    h = _toy_like_h(B, S, seed=5)
    valid = torch.ones(B, S, dtype=torch.bool)
    valid[3, 12:] = False
    g = torch.Generator().manual_seed(6)
    # overconfident tokens: large KL where the entropy is low (what entropy sampling under-keeps)
    kl = torch.where(h < 0.01, 2.0, 0.05) * torch.rand(B, S, generator=g, dtype=torch.float64)
    k = budget(valid.sum(1), 0.2)
    n_kept, n_valid = float(k.sum()), float(valid.sum())
    pi = inclusion_probabilities(h, valid, k)
    _, masks = _mc_frequencies(h, valid, k, draws=draws, seed=7)
    w = torch.where(masks, 1.0 / pi.clamp_min(1e-300), torch.zeros(())) * (n_kept / n_valid)
    weighted = (w * kl).sum((1, 2)) / n_kept          # the loss contract: weighted sum / kept count
    plain = (masks * kl).sum((1, 2)) / n_kept
    target = float(kl[valid].mean())
    se = float(weighted.std() / draws ** 0.5)
    assert abs(float(weighted.mean()) - target) < 4 * se, (float(weighted.mean()), target, se)
    assert abs(float(plain.mean()) - target) > 20 * float(plain.std() / draws ** 0.5)  # biased without weights


def test_select_tokens_weights_and_loss_contract():
    h = _toy_like_h(3, 16, seed=8).float()
    valid = torch.ones_like(h, dtype=torch.bool)
    valid[0, 10:] = False
    d, f = torch.rand(3, 16, generator=torch.Generator().manual_seed(9)), torch.zeros(3, 16)
    cfg = SelectionConfig(policy="entropy_sampling", keep_ratio=0.25, weighting="inverse_inclusion")
    r = select_tokens(cfg, norm_entropy=h, reverse_kl=d, forward_kl=f, valid=valid, step=3)
    plain = select_tokens(SelectionConfig(policy="entropy_sampling", keep_ratio=0.25), norm_entropy=h,
                          reverse_kl=d, forward_kl=f, valid=valid, step=3)
    assert torch.equal(r.mask, plain.mask) and plain.weights is None  # same sampler, weights only added
    pi = inclusion_probabilities(h, valid, budget(valid.sum(1), 0.25))
    expect = inverse_inclusion_weights(pi, r.mask, n_kept=float(r.mask.sum()), n_valid=float(valid.sum()))
    torch.testing.assert_close(r.weights, expect)
    assert not r.weights[~r.mask].any() and (r.weights[r.mask] > 0).all()
    assert r.metrics["weight_max"] == float(r.weights.max())

    # loss.py: Σ w·KL with the kept count as normalizer, gradient of the weighted sum (float64 reference)
    g = torch.Generator().manual_seed(10)
    n, V = int(r.mask.sum()), 11
    s_logits = torch.randn(n, V, generator=g, dtype=torch.float64, requires_grad=True)
    t_logits = torch.randn(n, V, generator=g, dtype=torch.float64)
    wk = r.weights[r.mask]
    loss_sum, count, report = kept_reverse_kl_loss(s_logits.float(), t_logits.float(), weights=wk)
    ps, lps, lpt = s_logits.softmax(-1), s_logits.log_softmax(-1), t_logits.log_softmax(-1)
    ref = (wk.double() * (ps * (lps - lpt)).sum(-1)).sum()
    assert int(count) == n
    torch.testing.assert_close(loss_sum.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(report["kept_rkl"][0].double(), ref, rtol=1e-5, atol=1e-6)
    x = s_logits.detach().float().requires_grad_(True)
    kept_reverse_kl_loss(x, t_logits.float(), weights=wk)[0].backward()
    (ref_grad,) = torch.autograd.grad(ref, s_logits)
    torch.testing.assert_close(x.grad.double(), ref_grad, rtol=1e-4, atol=1e-6)
