"""Exact distributed top-k and quantiles vs a single-process reference on the concatenation."""
import pytest
import torch
import torch.distributed as dist

from megatron_tip.selection import distributed_quantile, distributed_topk_mask
from megatron_tip.selection.topk import key_to_float, ordered_key
from megatron_tip.testing import RankFailure, run_distributed

try:  # run_distributed's teardown imports megatron.core in every rank (~5 s each on 2 cores):
    import megatron.core.parallel_state  # noqa: F401  importing once here, forked ranks inherit it
except ImportError:
    pass


def ref_topk_mask(scores: torch.Tensor, valid: torch.Tensor, k: int) -> torch.Tensor:
    """First k of a stable descending sort of the valid scores (ties: lower index first)."""
    vi = valid.nonzero().flatten()
    order = torch.sort(scores[vi] + 0.0, descending=True, stable=True).indices[:k]
    out = torch.zeros_like(valid)
    out[vi[order]] = True
    return out


def make_case(i: int, world: int):
    """Global (scores, valid, sizes, k) for case i; identical in every process."""
    g = torch.Generator().manual_seed(1000 + i)
    sizes = torch.randint(0, 40, (world,), generator=g).tolist()
    if i % 4 == 1:
        sizes[i % world] = 0  # an empty rank
    n = sum(sizes)
    kind = i % 5
    if kind == 0:
        s = torch.randn(n, generator=g)
    elif kind == 1:  # heavy ties
        s = torch.randint(-2, 3, (n,), generator=g).float() * 0.5
    elif kind == 2:  # all equal, including signed zeros
        s = torch.zeros(n) * torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    elif kind == 3:  # extremes
        pool = torch.tensor([float("inf"), float("-inf"), 3.0e38, -1e-45, 1e-45, 0.0, 7.0])
        s = pool[torch.randint(0, len(pool), (n,), generator=g)]
    else:
        s = torch.randn(n, generator=g, dtype=torch.float64)
    valid = torch.rand(n, generator=g) < 0.75
    s = torch.where(valid, s, torch.full_like(s, float("nan")))  # NaN at invalid positions is fine
    nv = int(valid.sum())
    k = [0, nv, nv + 3, max(nv - 1, 0), nv // 2, 1][i % 6]
    return s, valid, sizes, k


N_CASES = 36


def _run_cases(rank, world):
    bad = []
    for i in range(N_CASES):
        s, valid, sizes, k = make_case(i, world)
        lo = sum(sizes[:rank])
        sl = slice(lo, lo + sizes[rank])
        s_loc, v_loc = s[sl].clone(), valid[sl].clone()
        m = distributed_topk_mask(s_loc, v_loc, k, group=dist.group.WORLD)
        assert torch.equal(s_loc.nan_to_num(), s[sl].nan_to_num()) and torch.equal(v_loc, valid[sl])
        if not torch.equal(m, ref_topk_mask(s, valid, k)[sl]):
            bad.append(i)
    return bad


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_topk_matches_reference(world):
    assert run_distributed(_run_cases, world, timeout=120) == [[]] * world


def test_topk_single_process_fuzz():
    g = torch.Generator().manual_seed(0)
    for t in range(200):
        n = int(torch.randint(0, 60, (1,), generator=g))
        s = torch.randint(-3, 4, (n,), generator=g).float() if t % 2 else torch.randn(n, generator=g)
        v = torch.rand(n, generator=g) < 0.7
        k = int(torch.randint(0, n + 2, (1,), generator=g))
        m = distributed_topk_mask(s, v, k)
        assert torch.equal(m, ref_topk_mask(s, v, k))
        assert int(m.sum()) == min(k, int(v.sum()))
        # the kept values are exactly torch.topk's values
        kk = min(k, int(v.sum()))
        assert torch.equal(s[m].sort().values, torch.topk(s[v], kk).values.sort().values)


def test_ordered_key_roundtrip_and_order():
    x = torch.tensor([-float("inf"), -3e38, -1.0, -1e-45, 0.0, 1e-45, 2.5, 3e38, float("inf")])
    key = ordered_key(x)
    assert torch.all(key[1:] > key[:-1])
    assert [key_to_float(int(k), 32) for k in key] == x.tolist()
    assert ordered_key(torch.tensor([-0.0])) == ordered_key(torch.tensor([0.0]))


def test_topk_bad_args():
    with pytest.raises(ValueError, match="k must be"):
        distributed_topk_mask(torch.zeros(3), torch.ones(3, dtype=torch.bool), -1)
    with pytest.raises(ValueError, match="1-D"):
        distributed_topk_mask(torch.zeros(3), torch.ones(4, dtype=torch.bool), 1)
    with pytest.raises(ValueError, match="NaN"):
        distributed_topk_mask(torch.tensor([1.0, float("nan")]), torch.ones(2, dtype=torch.bool), 1)


def _nan_on_rank1(rank, world):
    s = torch.arange(5.0)
    if rank == 1:
        s[2] = float("nan")
    distributed_topk_mask(s, torch.ones(5, dtype=torch.bool), 3, group=dist.group.WORLD)


def test_topk_nan_raises_on_every_rank():
    with pytest.raises(RankFailure) as e:
        run_distributed(_nan_on_rank1, 3, timeout=60)
    msg = str(e.value)
    assert msg.startswith("3 rank(s) failed, 0 timed out")  # all raised together: no hang
    assert msg.count("1 NaN score(s) at valid positions") == 3


QS = [0.0, 0.02, 0.5, 0.98, 1.0, 0.37]


def _quantiles(rank, world):
    out = []
    for i in range(12):
        s, valid, sizes, _ = make_case(i * 5 + i % 4, world)  # float32 cases with ties and extremes
        s = s.clamp(-1e30, 1e30)  # finite: interpolation between infinities is undefined
        lo = sum(sizes[:rank])
        sl = slice(lo, lo + sizes[rank])
        out.append(distributed_quantile(s[sl], valid[sl], QS, group=dist.group.WORLD))
    return out


@pytest.mark.parametrize("world", [1, 3])
def test_quantile_matches_torch(world):
    res = run_distributed(_quantiles, world, timeout=120)
    for i in range(12):
        s, valid, _, _ = make_case(i * 5 + i % 4, world)
        s = s.clamp(-1e30, 1e30)
        for r in range(world):
            assert res[r][i] == res[0][i]  # identical on all ranks
        if valid.any():
            ref = torch.quantile(s[valid].double(), torch.tensor(QS, dtype=torch.float64))
            torch.testing.assert_close(torch.tensor(res[0][i], dtype=torch.float64), ref,
                                       rtol=1e-6, atol=1e-6)
