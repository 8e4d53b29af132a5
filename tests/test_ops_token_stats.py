"""Vocab-parallel token stats / reverse KL vs a gathered float64 reference, TP = 1, 2, 4 (gloo)."""
import math

import pytest
import torch
import torch.distributed as dist

from megatron_tip.ops import TokenStats, vocab_parallel_reverse_kl, vocab_parallel_token_stats
from megatron_tip.testing import run_distributed

FIELDS = ("entropy", "norm_entropy", "reverse_kl", "forward_kl", "teacher_entropy", "target_logprob")


def reference(zs, zt, vocab_size, target_ids, grad_w):
    """Full-vocab float64 statistics and d(sum w*KL)/dz_S (padding columns get 0)."""
    zs = zs.double().clone().requires_grad_(True)
    ls = torch.log_softmax(zs[..., :vocab_size], -1)
    lt = torch.log_softmax(zt.double()[..., :vocab_size], -1)
    ps, pt = ls.exp(), lt.exp()
    kl = (ps * (ls - lt)).sum(-1)
    (grad,) = torch.autograd.grad((kl * grad_w.double()).sum(), zs)
    ent = -(ps * ls).sum(-1).detach()
    return {
        "entropy": ent,
        "norm_entropy": ent / math.log(vocab_size),
        "reverse_kl": kl.detach(),
        "forward_kl": (pt * (lt - ls)).sum(-1).detach(),
        "teacher_entropy": -(pt * lt).sum(-1),
        "target_logprob": ls.gather(-1, target_ids[..., None])[..., 0].detach(),
        "grad": grad,
    }


def make_case(shape, width, vocab_size, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    zs = torch.randn(*shape, width, generator=g) * scale
    zt = zs + torch.randn(*shape, width, generator=g)  # correlated like a real teacher
    zs[..., vocab_size:] = 0.0  # padded vocab rows produce logit 0, not -inf
    zt[..., vocab_size:] = 0.0
    tid = torch.randint(0, vocab_size, shape, generator=g)
    w = torch.rand(*shape, generator=g)
    return zs, zt, tid, w


# (leading shape, per-rank width, padding columns, chunk_size, dtype)
CASES = [
    ((6, 5), 24, 0, 7, torch.float32),      # 30 tokens, chunk 7: uneven last chunk
    ((13,), 20, 9, 4, torch.float32),        # padded vocab
    ((11,), 16, 0, None, torch.bfloat16),    # bf16 inputs, default chunking
    ((3, 4), 8, 5, 1, torch.float32),        # chunk of one token
]


def _run_cases(rank, world, group):
    out = []
    for shape, width, pad, chunk, dtype in CASES:
        v = world * width - pad
        zs, zt, tid, w = make_case(shape, world * width, v)
        zs, zt = zs.to(dtype), zt.to(dtype)
        lo, hi = rank * width, (rank + 1) * width
        s_shard = zs[..., lo:hi].clone().requires_grad_(True)
        t_shard = zt[..., lo:hi].clone()
        s_before, t_before = s_shard.detach().clone(), t_shard.clone()
        st = vocab_parallel_token_stats(s_shard, t_shard, tp_group=group, vocab_size=v,
                                        chunk_size=chunk, target_ids=tid)
        assert isinstance(st, TokenStats)
        assert all(getattr(st, f).dtype == torch.float32 for f in FIELDS)
        assert not any(getattr(st, f).requires_grad for f in FIELDS)  # no graph recorded
        kl = vocab_parallel_reverse_kl(s_shard, t_shard, tp_group=group, vocab_size=v, chunk_size=chunk)
        assert kl.shape == shape and kl.dtype == torch.float32 and kl.requires_grad
        (kl * w).sum().backward()
        assert s_shard.grad.dtype == dtype
        # Never modify the caller's tensors, neither in forward nor in backward.
        assert torch.equal(s_shard.detach(), s_before) and torch.equal(t_shard, t_before)
        out.append(({f: getattr(st, f) for f in FIELDS}, kl.detach(), s_shard.grad.float()))
    return out


def _check(results, world):
    for i, (shape, width, pad, chunk, dtype) in enumerate(CASES):
        v = world * width - pad
        zs, zt, tid, w = make_case(shape, world * width, v)
        zs, zt = zs.to(dtype), zt.to(dtype)
        ref = reference(zs, zt, v, tid, w)
        atol = 1e-5 if dtype == torch.float32 else 2e-5  # bf16 inputs are exact in fp32 compute
        for r in range(world):
            stats, kl, _ = results[r][i]
            for f in FIELDS:
                torch.testing.assert_close(stats[f].double(), ref[f], atol=atol, rtol=1e-5, msg=f"{f} {i}")
            torch.testing.assert_close(kl.double(), ref["reverse_kl"], atol=atol, rtol=1e-5)
        grad = torch.cat([results[r][i][2] for r in range(world)], -1).double()
        gtol = 1e-5 if dtype == torch.float32 else 1e-2  # bf16 grad storage: ~3 significant digits
        torch.testing.assert_close(grad, ref["grad"], atol=gtol, rtol=gtol)
        assert (grad[..., v:] == 0).all()


@pytest.mark.parametrize("world", [1, 2, pytest.param(4, marks=pytest.mark.slow)])
def test_matches_gathered_reference(world):
    def fn(rank, ws):
        group = dist.new_group(list(range(ws)))
        return _run_cases(rank, ws, group)

    _check(run_distributed(fn, world, timeout=120), world)


def test_no_group_matches_reference():
    _check([_run_cases(0, 1, None)], 1)


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


def test_gradcheck_float64():
    g = torch.Generator().manual_seed(3)
    zs = torch.randn(5, 9, generator=g, dtype=torch.float64, requires_grad=True)
    zt = torch.randn(5, 9, generator=g, dtype=torch.float64)
    fn = lambda z: vocab_parallel_reverse_kl(z, zt, vocab_size=7, chunk_size=2)  # noqa: E731
    assert fn(zs).dtype == torch.float64  # fp64 inputs compute in fp64
    assert torch.autograd.gradcheck(fn, (zs,), eps=1e-6, atol=1e-7)


def test_teacher_gets_no_gradient():
    zs = torch.randn(4, 10, requires_grad=True)
    zt = torch.randn(4, 10, requires_grad=True)
    vocab_parallel_reverse_kl(zs, zt).sum().backward()
    assert zs.grad is not None and zt.grad is None


def test_bad_inputs():
    zs, zt = torch.randn(4, 10), torch.randn(4, 10)
    with pytest.raises(ValueError, match=r"\(4, 10\).*\(4, 11\)"):
        vocab_parallel_token_stats(zs, torch.randn(4, 11))
    with pytest.raises(ValueError, match=r"\(4, 10\).*\(3, 10\)"):
        vocab_parallel_reverse_kl(zs, torch.randn(3, 10))
    for bad in (11, 0, -2):
        with pytest.raises(ValueError, match=rf"vocab_size={bad}.*total shard width 10.*\(4, 10\)"):
            vocab_parallel_token_stats(zs, zt, vocab_size=bad)
    with pytest.raises(ValueError, match="target_ids shape"):
        vocab_parallel_token_stats(zs, zt, target_ids=torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="target_ids must lie"):
        vocab_parallel_token_stats(zs, zt, vocab_size=8, target_ids=torch.full((4,), 8))
