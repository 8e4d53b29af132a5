"""Shared cases for test_selection_policies.py: select_tokens policies: budgets, entropy-sampling law, reproducibility, multi-rank equivalence."""
import torch
from megatron_tip.selection import select_tokens


def batch(B=6, S=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.rand(B, S, generator=g)
    d = torch.rand(B, S, generator=g) ** 3 * 2
    f = torch.rand(B, S, generator=g) * 3
    lengths = torch.randint(0, S + 1, (B,), generator=g)
    start = torch.randint(0, 3, (B,), generator=g)  # prompt tokens before the response
    pos = torch.arange(S)[None]
    v = (pos >= start[:, None]) & (pos < (start + lengths).clamp(max=S)[:, None])
    h[~v] = float("nan")  # padding may hold anything
    return h, d, f, v


def run(cfg, h, d, f, v, **kw):
    return select_tokens(cfg, norm_entropy=h, reverse_kl=d, forward_kl=f, valid=v, **kw)
