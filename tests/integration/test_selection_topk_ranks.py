"""Exact distributed top-k and quantiles over 1-4 gloo ranks vs a single-process reference."""
import pytest
import torch
import torch.distributed as dist
from megatron_tip.selection import distributed_quantile, distributed_topk_mask
from megatron_tip.launch import RankFailure, run_distributed
from tests.helpers.topk_cases import ref_topk_mask


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
