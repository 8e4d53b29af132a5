"""select_tokens: from per-token statistics to the kept-token mask (Eq. 8–9, Tables 3/6/8, §7.3).

Collective schedule (identical on every rank, decided by the config and by all-reduced
values only): 1 all-gather of the local rollout count, 2 all-reduces of global stats,
4 histogram all-reduces for the needed percentiles/medians (all in one lockstep select),
[rank normalization: 2 histogram all-reduces], [global scope: the top-k collectives],
1 all-reduce of the metric counts.

Randomness (entropy_sampling, random) is drawn per rollout from a generator seeded by
(config.seed, step, global rollout index), the index being the rollout's position in
the rank-ordered global batch. So results are reproducible and do not depend on how the
global batch is split over ranks.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist

from megatron_tip.seeding import derive_seed
from megatron_tip.selection.config import SelectionConfig
from megatron_tip.selection.scores import batch_stats, classify, normalize, q3_score, soft_or
from megatron_tip.selection.topk import Comm, distributed_topk_mask, ordered_key

_ZERO_TIER = -1e200  # Efraimidis–Spirakis keys of h > 0 are >= -3e46: zero weights sort after


@dataclass
class SelectionResult:
    """Output of :func:`select_tokens` (tensors [B, S] on the input device)."""
    mask: torch.Tensor       # bool: kept tokens, a subset of valid
    scores: torch.Tensor     # fp32: the score the policy used, 0 where invalid
    quadrant: torch.Tensor   # int8: 1..4, 0 where invalid
    metrics: dict[str, float] = field(default_factory=dict)  # global batch, same on all ranks


def per_rollout_uniform(valid: torch.Tensor, seeds: list[int]) -> torch.Tensor:
    """float64 [B, S]: U(0, 1] at valid positions (m draws per row, in position order), 1 elsewhere.

    Drawing exactly m values per row keeps a rollout's stream independent of padding width.
    """
    u = torch.ones(valid.shape, dtype=torch.float64)
    vcpu = valid.cpu()
    for b, s in enumerate(seeds):
        m = int(vcpu[b].sum())
        if m:
            g = torch.Generator().manual_seed(s)
            u[b, vcpu[b]] = 1.0 - torch.rand(m, generator=g, dtype=torch.float64)  # (0, 1]: log is finite
    return u.to(valid.device)


def sampling_keys(weights: torch.Tensor, valid: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Efraimidis–Spirakis keys float64 [B, S]: top-n by key = n draws without replacement, p ∝ w.

    Successive draws follow p ∝ w among the remaining tokens (same law as torch.multinomial
    without replacement). Weights <= 0 (e.g. h = 0) are drawn only after every positive one,
    uniformly at random among themselves; so a rollout with all h = 0 is sampled uniformly.
    Invalid positions get -inf.
    """
    w = weights.double()
    pos = valid & (w > 0)
    keys = torch.where(pos, torch.log(u) / torch.where(pos, w, torch.ones_like(w)),
                       _ZERO_TIER * (2.0 - u))
    return torch.where(valid, keys, torch.full_like(keys, -math.inf))


def budget(m: torch.Tensor, keep_ratio: float, min_keep: int = 0) -> torch.Tensor:
    """⌊ρ·m⌋ floored at min_keep, capped at m (int64, elementwise).

    The 1e-6 slack stops representation error (0.29·100 = 28.999…) from losing a token.
    """
    k = torch.floor(m.double() * keep_ratio + 1e-6).long()
    return torch.minimum(torch.clamp(k, min=min_keep), m.long())


def per_row_topk_mask(scores: torch.Tensor, valid: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """bool [B, S]: the k[b] highest valid scores of each row, ties to the lower index."""
    key = ordered_key(scores).long()
    # int64 min lies below the key of every non-NaN float32/float64, -inf included
    key = torch.where(valid, key, torch.full_like(key, torch.iinfo(torch.int64).min))
    order = torch.sort(key, dim=1, descending=True, stable=True).indices
    take = torch.arange(scores.shape[1], device=scores.device)[None, :] < k[:, None]
    return torch.zeros_like(valid).scatter(1, order, take) & valid


def _check_inputs(**ts: torch.Tensor) -> None:
    valid = ts["valid"]
    if valid.dtype != torch.bool or valid.dim() != 2:
        raise ValueError(f"valid must be a bool [B, S] tensor, got {valid.dtype} {tuple(valid.shape)}")
    for name, t in ts.items():
        if t.shape != valid.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(valid.shape)}")
        if name != "valid" and not t.is_floating_point():
            raise ValueError(f"{name} must be floating point, got {t.dtype}")


def select_tokens(config: SelectionConfig, *, norm_entropy: torch.Tensor, reverse_kl: torch.Tensor,
                  forward_kl: torch.Tensor, valid: torch.Tensor,
                  group: Optional[dist.ProcessGroup] = None, step: int = 0) -> SelectionResult:
    """Select the tokens that get a gradient for this rank's rollouts.

    norm_entropy, reverse_kl, forward_kl: float [B, S]; valid: bool [B, S] (response
    tokens that count). group: data-parallel group spanning the global batch (None =
    single process). Normalization, thresholds, global top-k and metrics use the whole
    global batch. Raises ValueError on every rank if any valid statistic is NaN.
    """
    _check_inputs(norm_entropy=norm_entropy, reverse_kl=reverse_kl, forward_kl=forward_kl, valid=valid)
    h, d, f = (t.detach().float() for t in (norm_entropy, reverse_kl, forward_kl))
    comm = Comm(group, valid.device)
    B = valid.shape[0]
    row0 = sum(comm.all_gather_int(B)[:comm.rank])
    minmax = config.normalization == "minmax"
    st = batch_stats(h, d, f, valid, comm=comm, clip_percentile=config.entropy_clip_percentile if minmax else None,
                     h_threshold=config.h_threshold, kl_threshold=config.kl_threshold)
    n = st.n_valid
    quadrant = classify(h, d, valid, st.h_threshold, st.kl_threshold)
    h_hat, d_hat = normalize(h, d, valid, st, normalization=config.normalization, group=group)

    pol, rho = config.policy, config.keep_ratio
    seeds = [derive_seed(config.seed, step, row0 + b) for b in range(B)]
    zero = torch.zeros_like(h)
    if pol in ("all", "quadrants"):
        score = soft_or(h_hat, d_hat)
        mask = valid.clone() if pol == "all" else valid & torch.isin(
            quadrant, torch.tensor(config.quadrants, dtype=torch.int8, device=valid.device))
    else:
        name = "random" if pol == "random" else config.score
        if pol == "entropy_sampling":
            score = h
            u = per_rollout_uniform(valid, seeds)
            rank_key = sampling_keys(h, valid, u)
        else:
            score = {"soft_or": lambda: soft_or(h_hat, d_hat), "entropy": lambda: h,
                     "reverse_kl": lambda: d, "q3": lambda: q3_score(f, h_hat),
                     "random": lambda: per_rollout_uniform(valid, seeds).float()}[name]()
            rank_key = -score if pol == "bottomk" else score  # ties still go to the lower index
        if config.scope == "per_sequence":
            k_row = budget(valid.sum(1), rho, config.min_keep_per_sequence)
            mask = per_row_topk_mask(rank_key, valid, k_row)
        else:
            k = int(budget(torch.tensor(n), rho))
            mask = distributed_topk_mask(rank_key.reshape(-1), valid.reshape(-1), k,
                                         group=group).view_as(valid)
    score = torch.where(valid, score.float(), zero)

    qs = torch.arange(1, 5, dtype=torch.int8, device=valid.device)[:, None, None]
    in_q = quadrant[None] == qs
    counts = torch.cat([mask.sum()[None], in_q.sum((1, 2)), (in_q & mask[None]).sum((1, 2))])
    counts = comm.all_reduce(counts.to(torch.float64)).cpu().tolist()
    n_kept = counts[0]
    metrics = {"n_valid": float(n), "n_kept": n_kept, "kept_ratio": n_kept / n if n else 0.0}
    for i in range(4):
        metrics[f"frac_q{i + 1}"] = counts[1 + i] / n if n else 0.0
        metrics[f"kept_frac_q{i + 1}"] = counts[5 + i] / n_kept if n_kept else 0.0
    metrics.update(mean_h=st.mean_h, mean_rkl=st.mean_rkl, mean_fkl=st.mean_fkl, h_threshold=st.h_threshold,
                   kl_threshold=st.kl_threshold, h_clip=st.h_clip, h_min=st.h_min, h_max=st.h_max,
                   rkl_min=st.rkl_min, rkl_max=st.rkl_max)
    return SelectionResult(mask=mask, scores=score, quadrant=quadrant, metrics=metrics)
