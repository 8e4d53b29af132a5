"""select_tokens policies in one process: budgets, entropy-sampling law, reproducibility."""
import itertools
import math
import pytest
import torch
from megatron_tip.selection import SelectionConfig
from tests.helpers.selection_cases import batch, run


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
