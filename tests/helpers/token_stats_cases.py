"""Shared cases for test_ops_token_stats.py: Vocab-parallel token stats / reverse KL vs a gathered float64 reference, TP = 1, 2, 4 (gloo)."""
import math
import torch
from megatron_tip.ops import TokenStats, vocab_parallel_reverse_kl, vocab_parallel_token_stats


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
