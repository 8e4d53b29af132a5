"""Inclusion probabilities of the entropy sampler and the inverse-inclusion (Horvitz–Thompson) weights.

The entropy-sampling baseline (paper Table 3, App. "Entropy-Weighted Sampling") keeps k = ⌊ρm⌋
positions of a rollout drawn without replacement with p ∝ w (w = h). Its inclusion probability
π_i = P(i is kept) is not ∝ w, so the plain kept-token mean is a biased estimate of the
all-token loss. Weighting kept token i by 1/π_i makes Σ_{kept} KL_i/π_i an unbiased estimate
of Σ_all KL_i (Horvitz–Thompson), whatever the π_i, as long as every token with a loss has
π_i > 0.

With Efraimidis–Spirakis keys, i is kept iff T_i = E_i/w_i (E_i ~ Exp(1)) is among the k
smallest of independent exponentials T_j ~ Exp(w_j), so

    π_i = ∫_0^∞ w_i e^{-w_i t} P(#{j ≠ i: T_j < t} ≤ k − 1) dt
        = ∫_0^1 P(N_{-i}(t(u)) ≤ k − 1) du,   t(u) = −log(1 − u)/w_i,

with N_{-i}(t) a sum of independent Bernoulli(1 − e^{-w_j t}). Two ways to evaluate it:

- ``exact`` (rows with m ≤ ``exact_max_len``): Gauss–Legendre in u, the Poisson-binomial CDF
  by dynamic programming; exact up to quadrature error (tested against Monte-Carlo frequencies
  of the sampler itself).
- ``rosen`` (longer rows): π_i ≈ 1 − e^{-w_i τ} with τ solving Σ_j (1 − e^{-w_j τ}) = k (the
  n-th order statistic replaced by its deterministic limit; Rosén 1997, successive sampling).
  Exact for equal weights and for k = m; its error shrinks as m grows (measured in the tests).

Weights ≤ 0 (h = 0) are drawn only after every positive one (``policies.sampling_keys``): if k
reaches the number of positive weights those are all kept (π = 1) and the rest share the
remaining draws uniformly; otherwise they are never kept (π = 0: the estimate then misses
their loss, which is why a zero-entropy token with a loss makes it biased).
"""
from __future__ import annotations

import math

import numpy as np
import torch

_NODES = 128  # Gauss–Legendre nodes in u; 128 keeps the quadrature error below Monte-Carlo noise (tests)
_ROW_CHUNK = 8  # rows per exact DP batch (memory: chunk × m × nodes × k doubles)


def _legendre(nodes: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    x, w = np.polynomial.legendre.leggauss(nodes)
    return (torch.tensor((x + 1) / 2, dtype=torch.float64, device=device),
            torch.tensor(w / 2, dtype=torch.float64, device=device))


def _exact_rows(w: torch.Tensor, pos: torch.Tensor, k: torch.Tensor, nodes: int) -> torch.Tensor:
    """π [R, M] for rows whose positive weights ``w`` (float64 [R, M], ``pos`` marks them) have k < count."""
    R, M = w.shape
    K = int(k.max())
    u, wq = _legendre(nodes, w.device)
    wi = torch.where(pos, w, torch.ones_like(w))
    t = -torch.log1p(-u)[None, None, :] / wi[:, :, None]                        # [R, i, G]
    not_self = ~torch.eye(M, dtype=torch.bool, device=w.device)
    P = torch.zeros(R, M, nodes, K, dtype=torch.float64, device=w.device)     # P(N = c), c < K
    P[..., 0] = 1.0
    for j in range(M):
        use = (pos[:, j:j + 1] & not_self[j][None, :]).double()                  # [R, i]
        q = -torch.expm1(-w[:, j, None, None] * t) * use[:, :, None]       # [R, i, G]
        q = q[..., None]
        shifted = torch.nn.functional.pad(P[..., :-1], (1, 0))
        P = P * (1.0 - q) + shifted * q
    below = torch.arange(K, device=w.device)[None, :] < k[:, None]              # counts <= k-1
    cdf = (P * below[:, None, None, :].double()).sum(-1)                        # [R, i, G]
    return torch.where(pos, (cdf * wq).sum(-1).clamp(0.0, 1.0), torch.zeros_like(w))


def _rosen_rows(w: torch.Tensor, pos: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """π ≈ 1 − exp(−w τ) with Σ(1 − exp(−w τ)) = k per row (bisection on log τ); float64 [R, M]."""
    wp = torch.where(pos, w, torch.zeros_like(w))
    wmax = wp.max(1).values
    wmin = torch.where(pos, w, torch.full_like(w, math.inf)).min(1).values
    lo = torch.log(1e-6 / wmax)   # f(lo) <= m·1e-6 < k for every row here (k >= 1)
    hi = torch.log(60.0 / wmin)   # f(hi) >= count·(1 − e^-60) > k (k < count)
    for _ in range(100):
        mid = (lo + hi) / 2
        f = (-torch.expm1(-wp * torch.exp(mid)[:, None])).sum(1)
        below = f < k
        lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
    tau = torch.exp((lo + hi) / 2)
    return torch.where(pos, -torch.expm1(-wp * tau[:, None]), torch.zeros_like(w))


def inclusion_probabilities(weights: torch.Tensor, valid: torch.Tensor, k: torch.Tensor, *,
                            exact_max_len: int = 64, nodes: int = _NODES) -> torch.Tensor:
    """float64 [B, S]: P(position kept) when each row keeps k[b] valid positions drawn without
    replacement with p ∝ weights (the ``entropy_sampling`` sampler); 0 where invalid.

    weights: float [B, S]; valid: bool [B, S]; k: int [B] (0 <= k <= valid count). Rows with at
    most ``exact_max_len`` positive weights use the exact integral, longer rows Rosén's
    approximation (module docstring). Every row's π sums to k[b].
    """
    w = weights.detach().double()
    k = k.to(valid.device).long()
    pos = valid & (w > 0)
    w = torch.where(pos, w, torch.zeros_like(w))  # padding may hold NaN; 0 · NaN would leak into the DP
    n_pos, n_valid = pos.sum(1), valid.sum(1)
    pi = torch.zeros_like(w)
    # k reaches the positive weights: those are all kept, the zero weights share the rest uniformly
    full = k >= n_pos
    n_zero = (n_valid - n_pos).clamp(min=1)
    rest = ((k - n_pos).clamp(min=0).double() / n_zero.double())[:, None]
    pi = torch.where(full[:, None] & pos, torch.ones_like(w), pi)
    pi = torch.where(full[:, None] & valid & ~pos, rest.expand_as(w), pi)
    rows = (~full & (k > 0)).nonzero()[:, 0]
    if rows.numel():
        short = rows[n_pos[rows] <= exact_max_len]
        long = rows[n_pos[rows] > exact_max_len]
        if long.numel():
            pi[long] = _rosen_rows(w[long], pos[long], k[long].double())
        for c in range(0, short.numel(), _ROW_CHUNK):
            r = short[c:c + _ROW_CHUNK]
            # compact each row's positive weights to the left: the DP runs over M = max count
            order = torch.sort((~pos[r]).int(), dim=1, stable=True).indices
            M = int(n_pos[r].max())
            idx = order[:, :M]
            got = _exact_rows(torch.gather(w[r], 1, idx), torch.gather(pos[r], 1, idx), k[r], nodes)
            out = torch.zeros_like(w[r])
            pi[r] = out.scatter(1, idx, got)
    return torch.where(valid, pi, torch.zeros_like(pi))


def inverse_inclusion_weights(pi: torch.Tensor, mask: torch.Tensor, *, n_kept: float,
                              n_valid: float) -> torch.Tensor:
    """fp32 [B, S] loss weights |T| / (N · π_t) at kept positions, 0 elsewhere.

    With the loss contract Σ_kept w_t·KL_t / |T| (megatron divides by the global kept count
    |T|), this equals (1/N) Σ_kept KL_t/π_t: the Horvitz–Thompson estimate of the all-token mean
    (1/N) Σ_all KL_t over the N valid tokens of the global batch. |T| and N are global counts.
    """
    scale = n_kept / n_valid if n_valid else 0.0
    safe = torch.where(mask, pi, torch.ones_like(pi))
    return torch.where(mask, scale / safe, torch.zeros_like(pi)).float()
