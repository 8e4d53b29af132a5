"""TP=4 (gloo ranks) with a padded vocabulary whose last shard is short or empty (issue #24).

Every rank of a group must issue the same collectives, so chunking may depend only on values equal
on all ranks (the padded shard width, the token count), never on a rank's count of valid columns.
The ranks shrink the ops' chunk budget (``token_stats.STATS_CHUNK_BYTES``) to a few rows so that the
default inner chunking really splits these small inputs; each rank records its all-reduces, and
the values and gradients are checked against float64 references on the gathered logits, for the
stats op and the fused output-layer op, eager and compiled path. CI runs the compiled path's chunk
loops with uncompiled kernel bodies (the collectives live in the loops, not in the kernels); the
slow variant runs real inductor kernels.
"""
import contextlib

import pytest
import torch
import torch.distributed as dist

from megatron_tip.launch import run_distributed
from megatron_tip.ops import vocab_parallel_reverse_kl, vocab_parallel_token_stats
from tests.helpers.fused_rkl_cases import check, kernels_uncompiled, make_inputs, run_fused
from tests.helpers.token_stats_cases import FIELDS, make_case, reference

WORLD, WIDTH = 4, 16
# 4*16 - 3: the last shard has 13 valid columns of 16; 3*16 - 2: rank 2 has 14, rank 3 none.
VOCABS = (WORLD * WIDTH - 3, (WORLD - 1) * WIDTH - 2)
# 208 B: 3 fp32 rows of 16 columns, but 4 rows of 13 (what chunking on valid columns would pick).
CHUNK_BYTES = 208
STATS_TOKENS, FUSED_TOKENS, FUSED_CHUNK = 23, 37, 8
FUSED_CASES = ((torch.float64, False, 1e-12), (torch.float64, True, 1e-12), (torch.float32, True, 2e-5))


def _rank(rank, world, impl, uncompiled):
    import megatron_tip.ops.token_stats as ts

    ts.STATS_CHUNK_BYTES = CHUNK_BYTES  # a forked rank: the change dies with it
    calls, orig = [], dist.all_reduce

    def recording(t, op=dist.ReduceOp.SUM, group=None, async_op=False):
        calls.append((str(op), t.numel()))
        return orig(t, op=op, group=group, async_op=async_op)

    dist.all_reduce = recording
    sl = slice(rank * WIDTH, (rank + 1) * WIDTH)
    out = []
    try:
        with kernels_uncompiled() if uncompiled else contextlib.nullcontext():
            for v in VOCABS:
                zs, zt, tid, w = make_case((STATS_TOKENS,), world * WIDTH, v)
                s = zs[:, sl].clone().requires_grad_(True)
                st = vocab_parallel_token_stats(s.detach(), zt[:, sl], tp_group=dist.group.WORLD, vocab_size=v,
                                                target_ids=tid, impl=impl)
                kl = vocab_parallel_reverse_kl(s, zt[:, sl], tp_group=dist.group.WORLD, vocab_size=v, impl=impl)
                (kl * w).sum().backward()
                fused = []
                for dtype, weighted, _ in FUSED_CASES:
                    ws, wt, hs, ht, fw = make_inputs(FUSED_TOKENS, world * WIDTH, 16, 12)
                    fused.append(run_fused(ws, wt, hs, ht, fw, rank=rank, world=world, group=dist.group.WORLD,
                                           vocab_size=v, dtype=dtype, chunk=FUSED_CHUNK, impl=impl,
                                           weighted=weighted))
                out.append(({f: getattr(st, f) for f in FIELDS}, kl.detach(), s.grad, fused))
    finally:
        dist.all_reduce = orig
    return out, calls


def _check(res):
    calls = [r[1] for r in res]
    assert all(c == calls[0] for c in calls), "ranks issued different all-reduces"
    for i, v in enumerate(VOCABS):
        zs, zt, tid, w = make_case((STATS_TOKENS,), WORLD * WIDTH, v)
        ref = reference(zs, zt, v, tid, w)
        for stats, kl, _, _ in (r[0][i] for r in res):
            for f in FIELDS:
                torch.testing.assert_close(stats[f].double(), ref[f], atol=1e-5, rtol=1e-5, msg=f"{f} V={v}")
            torch.testing.assert_close(kl.double(), ref["reverse_kl"], atol=1e-5, rtol=1e-5)
        grad = torch.cat([r[0][i][2] for r in res], -1).double()
        torch.testing.assert_close(grad, ref["grad"], atol=1e-5, rtol=1e-5)
        assert (grad[:, v:] == 0).all()
        for j, (_, weighted, tol) in enumerate(FUSED_CASES):
            ws, wt, hs, ht, fw = make_inputs(FUSED_TOKENS, WORLD * WIDTH, 16, 12)
            check([r[0][i][3][j] for r in res], ws, wt, hs, ht, fw, vocab_size=v, weighted=weighted,
                  atol=tol, rtol=tol)


@pytest.mark.parametrize("impl", ["eager", "compiled"])
def test_tp4_short_and_empty_last_shard_match_reference(impl):
    _check(run_distributed(_rank, WORLD, impl, True, timeout=180))


@pytest.mark.slow
def test_tp4_short_and_empty_last_shard_real_compiled_kernels():
    """The same with inductor kernels on every rank (CI: the loop logic above; compiling is slow)."""
    _check(run_distributed(_rank, WORLD, "compiled", False, timeout=3600))
