"""TP=2 (gloo ranks): the fused output-layer + reverse-KL op and the compiled path vs float64 references.

Padded vocabulary throughout (the last rank's shard ends in padding rows). The chunk-loop logic of
the compiled path runs with uncompiled kernel bodies in CI; real inductor kernels at TP=2 are slow.
"""
import os

import pytest
import torch
import torch.distributed as dist

import megatron_tip.ops.compiled as C
from megatron_tip.launch import run_distributed
from megatron_tip.ops import vocab_parallel_linear_reverse_kl, vocab_parallel_reverse_kl, vocab_parallel_token_stats
from tests.helpers.fused_rkl_cases import (
    check,
    check_extreme,
    extreme_logits,
    kernels_uncompiled,
    make_inputs,
    run_fused,
)
from tests.helpers.token_stats_cases import _check, _run_cases, reference

WIDTH, PAD = 28, 6          # per-rank weight rows; the last 6 global rows are padding
VOCAB = 2 * WIDTH - PAD
CASES = [  # (dtype, tokens, chunk, weighted, tolerance)
    (torch.float64, 37, 8, False, 1e-12),
    (torch.float64, 5, 16, True, 1e-12),   # fewer tokens than a chunk
    (torch.float32, 37, 8, True, 2e-5),
]


def _fused_cases(rank, world, impl):
    out = []
    for dtype, n, chunk, weighted, _ in CASES:
        ws, wt, hs, ht, w = make_inputs(n, world * WIDTH, 16, 12)
        out.append(run_fused(ws, wt, hs, ht, w, rank=rank, world=world, group=dist.group.WORLD,
                             vocab_size=VOCAB, dtype=dtype, chunk=chunk, impl=impl, weighted=weighted))
    return out


def _check_fused(res, world):
    for i, (dtype, n, chunk, weighted, tol) in enumerate(CASES):
        ws, wt, hs, ht, w = make_inputs(n, world * WIDTH, 16, 12)
        check([r[i] for r in res], ws, wt, hs, ht, w, vocab_size=VOCAB, weighted=weighted, atol=tol, rtol=tol)


def _extreme_case(rank, world):
    width, v = 12, 2 * 12 - 3
    zs, zt = extreme_logits(world * width, v)
    sl = slice(rank * width, (rank + 1) * width)
    s = zs[:, sl].clone().requires_grad_(True)
    st = vocab_parallel_token_stats(s.detach(), zt[:, sl], tp_group=dist.group.WORLD, vocab_size=v,
                                    impl="compiled")
    kl = vocab_parallel_reverse_kl(s, zt[:, sl], tp_group=dist.group.WORLD, vocab_size=v, chunk_size=4,
                                   impl="compiled")
    kl.sum().backward()
    return st, kl.detach(), s.grad


def _check_extreme(res):
    width, v = 12, 2 * 12 - 3
    zs, zt = extreme_logits(2 * width, v)
    grad = torch.cat([r[2] for r in res], -1)
    for st, kl, _ in res:
        check_extreme(st, kl, grad, zs, zt, v, reference)


def test_tp2_fused_and_compiled_loop_match_reference():
    """One forked group: fused op (eager, compiled loop) and the shared token-stats cases (padded
    vocab, bf16, chunk of one) plus extreme logits through the compiled loop, vs float64 references."""
    def fn(rank, world):
        with kernels_uncompiled():
            os.environ[C.ENV_VAR] = "compiled"  # a forked rank: its environment dies with it
            stats = _run_cases(rank, world, dist.group.WORLD)
            del os.environ[C.ENV_VAR]
            fused_compiled = _fused_cases(rank, world, "compiled")
            extreme = _extreme_case(rank, world)
        return stats, _fused_cases(rank, world, "eager"), fused_compiled, extreme

    res = run_distributed(fn, 2, timeout=180)
    _check([r[0] for r in res], 2)
    _check_fused([r[1] for r in res], 2)
    _check_fused([r[2] for r in res], 2)
    _check_extreme([r[3] for r in res])


def test_tp2_matches_megatron_output_layer_path():
    """Drop-in check against megatron's own ColumnParallelLinear (its backward all-reduces the
    input gradient) followed by vocab_parallel_reverse_kl: same KL, hidden and weight gradients."""
    def fn(rank, world):
        from megatron.core import ModelParallelConfig
        from megatron.core.tensor_parallel import ColumnParallelLinear

        from megatron_tip.distributed import init_parallel

        ctx = init_parallel(2)
        torch.manual_seed(0)
        cfg = ModelParallelConfig(tensor_model_parallel_size=2, use_cpu_initialization=True,
                                  params_dtype=torch.float32)
        layer = ColumnParallelLinear(16, 2 * WIDTH, config=cfg, init_method=torch.nn.init.normal_, bias=False,
                                     gather_output=False)
        ws, wt, hs, ht, w = make_inputs(21, 2 * WIDTH, 16, 12)
        sl = slice(rank * WIDTH, (rank + 1) * WIDTH)
        with torch.no_grad():
            layer.weight.copy_(ws[sl].float())
        out = []
        for fused in (True, False):
            layer.weight.grad = None
            h = hs.float().clone().requires_grad_(True)
            t_w = wt[sl].float()
            if fused:
                kl = vocab_parallel_linear_reverse_kl(h, layer.weight, ht.float(), t_w, tp_group=ctx.tp_group,
                                                      vocab_size=VOCAB, chunk_size=4, impl="eager")
            else:
                logits, _ = layer(h.unsqueeze(1))  # [n, 1, V/TP]
                kl = vocab_parallel_reverse_kl(logits[:, 0], ht.float() @ t_w.t(), tp_group=ctx.tp_group,
                                               vocab_size=VOCAB, impl="eager")
            (kl * w.float()).sum().backward()
            out.append((kl.detach(), h.grad, layer.weight.grad.clone()))
        return out

    for fused, unfused in run_distributed(fn, 2, timeout=180):
        for a, b in zip(fused, unfused):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_tp2_real_compiled_kernels():
    """Inductor kernels on both ranks (rank 1's chunks are [rows, v_valid] views of padded rows)."""
    def fn(rank, world):
        os.environ[C.ENV_VAR] = "compiled"
        stats = _run_cases(rank, world, dist.group.WORLD)
        del os.environ[C.ENV_VAR]
        return stats, _fused_cases(rank, world, "compiled"), _extreme_case(rank, world), len(C.COMPILE_LOG)

    res = run_distributed(fn, 2, timeout=3600)
    _check([r[0] for r in res], 2)
    _check_fused([r[1] for r in res], 2)
    _check_extreme([r[2] for r in res])
    assert all(r[3] > 0 for r in res)  # really compiled
