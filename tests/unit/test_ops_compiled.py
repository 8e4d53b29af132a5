"""The compiled (torch.compile / inductor) path of the vocab-parallel ops, one process.

Real compiles cost ~15 s per kernel shape on the 2-core CPU box (more under load), so the CI test
compiles exactly three kernels (fp32, one chunk shape) and shares them between token stats,
reverse KL and the fused output-layer op; padded-vocab, fp64, bf16 and extreme-logit compiles are
marked slow. The chunk-loop logic itself runs in seconds with uncompiled kernel bodies.
"""
import warnings

import pytest
import torch
from torch._dynamo.utils import counters

import megatron_tip.ops.compiled as C
from megatron_tip.ops import (
    vocab_parallel_reverse_kl,
    vocab_parallel_token_stats,
)
from tests.helpers.fused_rkl_cases import (
    check,
    check_extreme,
    extreme_logits,
    kernels_uncompiled,
    make_inputs,
    run_fused,
)
from tests.helpers.token_stats_cases import FIELDS, _check, _run_cases, make_case, reference


def test_impl_switch(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv(C.ENV_VAR, raising=False)
    assert C.resolve_impl("auto", v_local=C.AUTO_MIN_VOCAB, device=cpu) == "compiled"
    assert C.resolve_impl("auto", v_local=C.AUTO_MIN_VOCAB - 1, device=cpu) == "eager"  # tiny: no compile
    assert C.resolve_impl("auto", v_local=10**5, device=torch.device("meta")) == "eager"  # no backend
    assert C.resolve_impl("compiled", v_local=8, device=cpu) == "compiled"
    monkeypatch.setenv(C.ENV_VAR, "eager")  # the environment sets what "auto" means...
    assert C.resolve_impl("auto", v_local=10**5, device=cpu) == "eager"
    monkeypatch.setenv(C.ENV_VAR, "compiled")
    assert C.resolve_impl("auto", v_local=8, device=cpu) == "compiled"
    assert C.resolve_impl("eager", v_local=10**5, device=cpu) == "eager"  # ...the keyword wins
    monkeypatch.setenv(C.ENV_VAR, "triton")
    with pytest.raises(ValueError, match=r"MEGATRON_TIP_OPS_IMPL='triton': allowed values are"):
        C.resolve_impl("auto", v_local=8, device=cpu)
    with pytest.raises(ValueError, match=r"impl='fast' is not one of \('auto', 'eager', 'compiled'\)"):
        vocab_parallel_token_stats(torch.zeros(2, 3), torch.zeros(2, 3), impl="fast")


def test_row_buckets_and_chunk_starts():
    assert [C.row_bucket(n, 16) for n in (1, 2, 3, 4, 5, 8, 9, 16, 17, 1000)] == [2, 2, 4, 4, 8, 8, 16, 16, 16, 16]
    assert [C.row_bucket(n, 27) for n in (1, 4, 5, 7, 8, 14, 15)] == [4, 4, 7, 7, 14, 14, 27]
    assert C.chunk_starts(37, 16) == [0, 16, 21]  # last chunk overlaps its predecessor
    assert C.chunk_starts(32, 16) == [0, 16] and C.chunk_starts(16, 16) == [0]


def test_compiled_loop_logic_matches_reference(monkeypatch):
    """The shared token-stats cases (padded vocab, bf16, chunk of one, short inputs) through the
    compiled path's loop, kernel bodies uncompiled; TP=2 in tests/integration/test_ops_fused_tp.py."""
    monkeypatch.setenv(C.ENV_VAR, "compiled")
    with kernels_uncompiled():
        _check([_run_cases(0, 1, None)], 1)


def test_compile_failure_warns_once_and_falls_back(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler\nmore lines")

    monkeypatch.setattr(C, "_KERNELS", {k: (body, broken) for k, (body, _) in C._KERNELS.items()})
    monkeypatch.setattr(C, "_state", {"broken": None})
    zs, zt, tid, w = make_case((9,), 20, 17)
    with pytest.warns(RuntimeWarning, match=r"torch.compile failed \(RuntimeError: no C\+\+ compiler\); using"):
        st = vocab_parallel_token_stats(zs, zt, vocab_size=17, chunk_size=4, target_ids=tid, impl="compiled")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # only once
        s = zs.clone().requires_grad_(True)
        (vocab_parallel_reverse_kl(s, zt, vocab_size=17, chunk_size=4, impl="compiled") * w).sum().backward()
    ref = reference(zs, zt, 17, tid, w)
    for f in FIELDS:
        torch.testing.assert_close(getattr(st, f).double(), ref[f], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s.grad.double(), ref["grad"], atol=1e-5, rtol=1e-5)


# One fp32 chunk shape [16, 96] (no padding) for every op below: three compiled kernels in all.
N, V, ROWS = 37, 96, 16


def test_compiled_kernels_match_reference_and_eager():
    zs, zt, tid, w = make_case((N,), V, V)
    ref = reference(zs, zt, V, tid, w)
    out = {}
    for impl in ("compiled", "eager"):
        s = zs.clone().requires_grad_(True)
        st = vocab_parallel_token_stats(s.detach(), zt, vocab_size=V, chunk_size=ROWS, target_ids=tid, impl=impl)
        kl = vocab_parallel_reverse_kl(s, zt, vocab_size=V, chunk_size=ROWS, impl=impl)
        (kl * w).sum().backward()
        assert torch.equal(s.detach(), zs)  # inputs untouched
        for f in FIELDS:
            torch.testing.assert_close(getattr(st, f).double(), ref[f], atol=1e-5, rtol=1e-5, msg=f"{impl} {f}")
        torch.testing.assert_close(kl.detach().double(), ref["reverse_kl"], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(s.grad.double(), ref["grad"], atol=1e-6, rtol=1e-5)
        out[impl] = (st, kl.detach(), s.grad)
    for f in FIELDS:  # compiled == eager up to fp32 reduction order
        torch.testing.assert_close(getattr(out["compiled"][0], f), getattr(out["eager"][0], f), atol=2e-6, rtol=2e-6)
    torch.testing.assert_close(out["compiled"][2], out["eager"][2], atol=1e-6, rtol=1e-5)
    compiled = [k for k in C.COMPILE_LOG if k[0] in ("partials", "grad_into")]
    assert len(compiled) == 3 and all(C.COMPILE_LOG[k] > 0 for k in compiled)

    # Fused output layer + RKL on the same [16, 96] chunk shape: no new kernel.
    ws, wt, hs, ht, weights = make_inputs(N, V, 16, 12)
    graphs = counters["stats"]["unique_graphs"]
    for weighted in (False, True):
        res = run_fused(ws, wt, hs, ht, weights, rank=0, world=1, group=None, vocab_size=V,
                        dtype=torch.float32, chunk=ROWS, impl="compiled", weighted=weighted)
        check([res], ws, wt, hs, ht, weights, vocab_size=V, weighted=weighted, atol=2e-5, rtol=2e-5)
    # Another token count in the same row bucket: no recompile either.
    zs2, zt2, _, _ = make_case((45,), V, V, seed=5)
    vocab_parallel_token_stats(zs2, zt2, vocab_size=V, chunk_size=ROWS, impl="compiled")
    assert counters["stats"]["unique_graphs"] == graphs


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_compiled_padded_vocab(dtype):
    """Padded vocab (compiled kernels on [rows, v_valid] views of wider rows) in fp64 (tight) and bf16."""
    width, v = 40, 33
    zs, zt, tid, w = make_case((23,), width, v)
    zs, zt = zs.to(dtype), zt.to(dtype)
    ref = reference(zs, zt, v, tid, w)
    s = zs.clone().requires_grad_(True)
    st = vocab_parallel_token_stats(s.detach(), zt, vocab_size=v, chunk_size=8, target_ids=tid, impl="compiled")
    kl = vocab_parallel_reverse_kl(s, zt, vocab_size=v, chunk_size=8, impl="compiled")
    (kl * w.to(kl.dtype)).sum().backward()
    tol, gtol = (1e-12, 1e-12) if dtype == torch.float64 else (2e-5, 1e-2)  # bf16 gradient storage
    for f in FIELDS:
        torch.testing.assert_close(getattr(st, f).double(), ref[f], atol=tol, rtol=tol, msg=f)
    torch.testing.assert_close(s.grad.double(), ref["grad"], atol=gtol, rtol=gtol)
    assert (s.grad[:, v:] == 0).all()
    ws, wt, hs, ht, weights = make_inputs(23, width, 16, 12)
    if dtype == torch.bfloat16:
        ws, wt, hs, ht = (x.bfloat16().double() for x in (ws, wt, hs, ht))
    res = run_fused(ws, wt, hs, ht, weights, rank=0, world=1, group=None, vocab_size=v, dtype=dtype,
                    chunk=8, impl="compiled", weighted=True)
    bf16 = dtype == torch.bfloat16  # tolerance as in test_ops_fused_linear_rkl.test_bf16_within_tolerance
    check([res], ws, wt, hs, ht, weights, vocab_size=v, weighted=True, atol=2e-2 if bf16 else tol,
          rtol=3e-2 if bf16 else tol, scaled=bf16)


def _extreme(v=30):
    zs, zt = extreme_logits(v, v)
    s = zs.clone().requires_grad_(True)
    st = vocab_parallel_token_stats(zs, zt, chunk_size=4, impl="compiled")
    kl = vocab_parallel_reverse_kl(s, zt, chunk_size=4, impl="compiled")
    kl.sum().backward()
    check_extreme(st, kl.detach(), s.grad, zs, zt, v, reference)


def test_extreme_logits_take_the_exact_max_kernel():
    """Subsampled shifts overflow at |logits| ~ 1e4: the loop falls back to exact maxima."""
    with kernels_uncompiled():
        _extreme()
        assert any(("exact", True) in k for k in C.COMPILE_LOG)


@pytest.mark.slow
def test_compiled_extreme_logits():
    _extreme()
    assert any(("exact", True) in k for k in C.COMPILE_LOG)
