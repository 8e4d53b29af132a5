"""select_tokens policies: budgets, entropy-sampling law, reproducibility, multi-rank equivalence."""
import itertools
import math

import pytest
import torch
import torch.distributed as dist

from megatron_tip.selection import SelectionConfig, select_tokens
from megatron_tip.testing import RankFailure, run_distributed

try:  # run_distributed's teardown imports megatron.core in every rank (~5 s each on 2 cores):
    import megatron.core.parallel_state  # noqa: F401  importing once here, forked ranks inherit it
except ImportError:
    pass


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


def test_per_sequence_budgets():
    h, d, f, v = batch()
    m = v.sum(1)
    for rho, mk in ((0.5, 0), (0.3, 2), (1.0, 0), (0.29, 0)):
        for pol in ("topk", "bottomk", "random", "entropy_sampling"):
            r = run(SelectionConfig(policy=pol, keep_ratio=rho, min_keep_per_sequence=mk), h, d, f, v)
            expect = [min(max(math.floor(rho * int(x) + 1e-6), mk), int(x)) for x in m]
            assert r.mask.sum(1).tolist() == expect, (pol, rho, mk)


def test_topk_bottomk_are_complementary_and_ordered():
    h, d, f, v = batch(B=4, S=10, seed=1)
    v[:] = True
    h = h.nan_to_num(0.5)
    top = run(SelectionConfig(policy="topk", keep_ratio=0.5), h, d, f, v)
    bot = run(SelectionConfig(policy="bottomk", keep_ratio=0.5), h, d, f, v)
    assert torch.equal(top.mask ^ bot.mask, v) and not (top.mask & bot.mask).any()
    for b in range(4):
        assert top.scores[b][top.mask[b]].min() >= top.scores[b][~top.mask[b]].max()


def test_global_scope_and_quadrants_policy():
    h, d, f, v = batch(seed=2)
    r = run(SelectionConfig(policy="topk", score="reverse_kl", keep_ratio=0.25, scope="global"), h, d, f, v)
    n = int(v.sum())
    assert int(r.mask.sum()) == math.floor(0.25 * n)
    assert d[r.mask].min() >= d[v & ~r.mask].max()  # divergence-only: raw reverse KL ranks
    q = run(SelectionConfig(policy="quadrants", quadrants=[1, 3]), h, d, f, v)
    assert torch.equal(q.mask, v & ((q.quadrant == 1) | (q.quadrant == 3)))
    assert q.metrics["kept_frac_q1"] + q.metrics["kept_frac_q3"] == pytest.approx(1.0)
    a = run(SelectionConfig(policy="all"), h, d, f, v)
    assert torch.equal(a.mask, v) and a.metrics["kept_ratio"] == 1.0
    assert sum(a.metrics[f"frac_q{i}"] for i in range(1, 5)) == pytest.approx(1.0)


def exact_inclusion(w, n):
    """P(token i among n sequential draws without replacement, p ∝ w among the remaining)."""
    p = [0.0] * len(w)
    for seq in itertools.permutations(range(len(w)), n):
        prob, left = 1.0, sum(w)
        for i in seq:
            prob *= w[i] / left
            left -= w[i]
        for i in seq:
            p[i] += prob
    return p


def test_entropy_sampling_inclusion_probabilities():
    w = [0.1, 0.2, 0.3, 0.4, 0.0]  # h; the h = 0 token is drawn only after all positive ones
    R = 4000
    h = torch.tensor([w] * R)
    v = torch.ones(R, 5, dtype=torch.bool)
    for rho, n in ((0.2, 1), (0.4, 2)):  # n = 1: first-draw frequencies ∝ h
        r = run(SelectionConfig(policy="entropy_sampling", keep_ratio=rho, seed=7), h, h, h, v, step=3)
        emp = r.mask.double().mean(0).tolist()
        ref = exact_inclusion(w[:4], n) + [0.0]
        for e, p in zip(emp, ref):
            assert abs(e - p) <= 4 * math.sqrt(max(p * (1 - p), 1e-12) / R) + 1e-9, (emp, ref)
    # all h = 0 in a rollout: uniform sampling; h = 0 tokens fill up after positive ones
    z = torch.zeros(R, 4)
    z[:, 1] = 0.5
    r = run(SelectionConfig(policy="entropy_sampling", keep_ratio=0.5), z, z, z, v[:, :4])
    emp = r.mask.double().mean(0)
    assert emp[1] == 1.0 and torch.allclose(emp[[0, 2, 3]], torch.full((3,), 1 / 3, dtype=torch.float64), atol=0.04)
    z0 = torch.zeros(R, 4)
    emp = run(SelectionConfig(policy="entropy_sampling", keep_ratio=0.25), z0, z0, z0, v[:, :4]).mask
    assert torch.allclose(emp.double().mean(0), torch.full((4,), 0.25, dtype=torch.float64), atol=0.04)


def test_random_policies_reproducible_and_step_dependent():
    h, d, f, v = batch(B=8, S=20, seed=4)
    for pol in ("entropy_sampling", "random"):
        cfg = SelectionConfig(policy=pol, keep_ratio=0.5, seed=11)
        a, b = run(cfg, h, d, f, v, step=5).mask, run(cfg, h, d, f, v, step=5).mask
        c = run(cfg, h, d, f, v, step=6).mask
        e = run(SelectionConfig(policy=pol, keep_ratio=0.5, seed=12), h, d, f, v, step=5).mask
        assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, e)


CONFIGS = [
    SelectionConfig(policy="topk", score="soft_or", keep_ratio=0.5),
    SelectionConfig(policy="topk", score="soft_or", keep_ratio=0.3, scope="global"),
    SelectionConfig(policy="topk", score="q3", keep_ratio=0.2, normalization="rank", scope="global"),
    SelectionConfig(policy="bottomk", score="entropy", keep_ratio=0.5, min_keep_per_sequence=3),
    SelectionConfig(policy="entropy_sampling", keep_ratio=0.5, seed=3),
    SelectionConfig(policy="entropy_sampling", keep_ratio=0.4, scope="global", seed=3),
    SelectionConfig(policy="random", keep_ratio=0.3, scope="global"),
    SelectionConfig(policy="quadrants", quadrants=[3], h_threshold=0.4),
    SelectionConfig(policy="all", entropy_clip_percentile=90.0),
]
ROWS = {2: [0, 9], 3: [4, 0, 5], 4: [2, 3, 1, 3]}  # rollouts per rank (9 in all; an empty rank)


def _select_slice(rank, world):
    h, d, f, v = batch(B=9, S=12, seed=5)
    lo = sum(ROWS[world][:rank])
    sl = slice(lo, lo + ROWS[world][rank])
    out = []
    for cfg in CONFIGS:
        r = select_tokens(cfg, norm_entropy=h[sl], reverse_kl=d[sl], forward_kl=f[sl], valid=v[sl],
                          group=dist.group.WORLD, step=2)
        out.append((r.mask, r.scores, r.quadrant, r.metrics))
    return out


@pytest.mark.parametrize("world", [2, 3, 4])
def test_multi_rank_equals_single_process(world):
    h, d, f, v = batch(B=9, S=12, seed=5)
    ref = [run(cfg, h, d, f, v, step=2) for cfg in CONFIGS]
    res = run_distributed(_select_slice, world, timeout=120)
    for c, r1 in enumerate(ref):
        mask = torch.cat([res[r][c][0] for r in range(world)])
        scores = torch.cat([res[r][c][1] for r in range(world)])
        quad = torch.cat([res[r][c][2] for r in range(world)])
        assert torch.equal(mask, r1.mask), CONFIGS[c]
        assert torch.equal(quad, r1.quadrant) and torch.equal(scores, r1.scores), CONFIGS[c]
        for r in range(world):
            for k, val in res[r][c][3].items():  # metrics identical on every rank (NaN: h_clip, rank)
                assert val == res[0][c][3][k] or (math.isnan(val) and math.isnan(res[0][c][3][k]))
        assert res[0][c][3].keys() == r1.metrics.keys()
        for k, val in r1.metrics.items():
            assert res[0][c][3][k] == pytest.approx(val, rel=1e-12, nan_ok=True), k


def _nan_rank(rank, world):
    h, d, f, v = batch(B=2, S=6, seed=rank)
    if rank == 2:
        h, d, v = h.nan_to_num(0.1), d.clone(), v.clone()
        v[0, 0], d[0, 0] = True, float("nan")
    select_tokens(SelectionConfig(), norm_entropy=h, reverse_kl=d, forward_kl=f, valid=v,
                  group=dist.group.WORLD)


def test_nan_rejected_on_every_rank():
    with pytest.raises(RankFailure) as e:
        run_distributed(_nan_rank, 3, timeout=60)
    assert str(e.value).startswith("3 rank(s) failed, 0 timed out")
    assert str(e.value).count("select_tokens: NaN at valid positions") == 3
