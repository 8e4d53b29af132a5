"""Vocab-parallel token stats / reverse KL vs a gathered float64 reference at TP = 1, 2, 4 (gloo ranks)."""
import pytest
import torch
import torch.distributed as dist
from megatron_tip.ops import vocab_parallel_reverse_kl, vocab_parallel_token_stats
from megatron_tip.launch import run_distributed
from tests.helpers.token_stats_cases import _check, _run_cases, make_case, reference


@pytest.mark.parametrize("world", [1, 2, pytest.param(4, marks=pytest.mark.slow)])
def test_matches_gathered_reference(world):
    def fn(rank, ws):
        group = dist.new_group(list(range(ws)))
        return _run_cases(rank, ws, group)

    _check(run_distributed(fn, world, timeout=120), world)


def test_collectives_and_group_width_check():
    """One forked group for two small checks (forking ranks dominates their cost)."""
    def fn(rank, ws):
        calls = []
        orig = dist.all_reduce

        def counting(t, op=dist.ReduceOp.SUM, group=None, async_op=False):
            calls.append(op)
            return orig(t, op=op, group=group, async_op=async_op)

        dist.all_reduce = counting
        zs, zt, _, _ = make_case((10,), 2 * 16, 32)
        vocab_parallel_token_stats(zs[:, rank * 16:(rank + 1) * 16], zt[:, rank * 16:(rank + 1) * 16],
                                   tp_group=dist.group.WORLD, chunk_size=4)
        dist.all_reduce = orig
        try:  # total width is 2 x 5 = 10
            vocab_parallel_token_stats(zs[:3, :5], zs[:3, :5], tp_group=dist.group.WORLD, vocab_size=11)
            msg = None
        except ValueError as e:
            msg = str(e)
        return calls, msg

    res = run_distributed(fn, 2, timeout=60)
    calls = res[0][0]
    assert len(calls) == 6  # 3 chunks x (one MAX + one SUM), batched over all statistics
    assert calls[0::2] == [dist.ReduceOp.MAX] * 3 and calls[1::2] == [dist.ReduceOp.SUM] * 3
    assert all(m and "total shard width 10" in m and "(3, 5)" in m for _, m in res)


def _extreme_inputs(width_total, v):
    g = torch.Generator().manual_seed(1)
    n = 6
    zs = torch.randn(n, width_total, generator=g) * 1e4  # magnitudes ~1e4
    zt = zs + torch.randn(n, width_total, generator=g) * 1e-2
    hot = torch.randint(0, v, (n,), generator=g)
    zs[:3] = 0.0  # rows 0-2: near one-hot student and teacher, same argmax
    zs[torch.arange(3), hot[:3]] = 1e4
    zt[:3] = zs[:3].clone()
    zt[0, (hot[0] + 1) % v] = 1e4 - 5.0  # tiny teacher mass elsewhere
    zt[1] = zs[1]  # identical rows: KL must be exactly 0
    zt[2] = -zs[2]  # teacher puts the student's argmax at -1e4: huge KL
    zs[:, v:] = 0.0
    zt[:, v:] = 0.0
    return zs, zt


@pytest.mark.parametrize("world", [1, 2])
def test_extreme_logits(world):
    width, pad = 12, 3
    v = world * width - pad

    def fn(rank, ws):
        zs, zt = _extreme_inputs(ws * width, v)
        sl = slice(rank * width, (rank + 1) * width)
        s = zs[:, sl].clone().requires_grad_(True)
        st = vocab_parallel_token_stats(s.detach(), zt[:, sl], tp_group=dist.group.WORLD, vocab_size=v)
        kl = vocab_parallel_reverse_kl(s, zt[:, sl], tp_group=dist.group.WORLD, vocab_size=v, chunk_size=4)
        kl.sum().backward()
        return st, kl.detach(), s.grad

    res = run_distributed(fn, world, timeout=60)
    zs, zt = _extreme_inputs(world * width, v)
    ref = reference(zs, zt, v, torch.zeros(6, dtype=torch.long), torch.ones(6))
    grad = torch.cat([r[2] for r in res], -1)
    assert torch.isfinite(grad).all()
    torch.testing.assert_close(grad.double(), ref["grad"], atol=1e-5, rtol=1e-4)
    for st, kl, _ in res:
        for f in ("entropy", "reverse_kl", "forward_kl", "teacher_entropy"):
            val = getattr(st, f)
            assert torch.isfinite(val).all(), f
            # Not clamped anywhere: exact math keeps KL/entropy >= 0 up to fp32 rounding.
            assert (val >= -1e-6).all(), (f, val)
            torch.testing.assert_close(val.double(), ref[f], atol=1e-5, rtol=1e-5, msg=f)
        assert st.reverse_kl[1] == 0 and st.forward_kl[1] == 0
        assert st.reverse_kl[2] > 1e4
        torch.testing.assert_close(kl, st.reverse_kl)
