"""Fused output layer + reverse KL (``vocab_parallel_linear_reverse_kl``) vs a float64 reference, one process.

The eager impl, and the compiled impl's chunk loop with uncompiled kernel bodies; inductor-compiled
kernels are covered in test_ops_compiled.py, TP=2 in tests/integration/test_ops_fused_tp.py.
"""
import contextlib

import pytest
import torch

from megatron_tip.ops import vocab_parallel_linear_reverse_kl, vocab_parallel_reverse_kl
from megatron_tip.testing.memory import PeakMemory
from tests.helpers.fused_rkl_cases import check, kernels_uncompiled, make_inputs, run_fused

# (tokens, chunk): several chunks with a short last one; fewer tokens than a chunk (row bucket).
SHAPES = [(37, 8), (5, 16)]


def _impl_ctx(impl):
    return kernels_uncompiled() if impl == "compiled" else contextlib.nullcontext()


@pytest.mark.parametrize("impl", ["eager", "compiled"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("weighted", [False, True], ids=["uniform", "weighted"])
def test_matches_float64_reference(impl, dtype, weighted):
    vocab, pad = 50, 6  # padded vocab: weight rows 50..55 are padding
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    for n, chunk in SHAPES:
        ws, wt, hs, ht, w = make_inputs(n, vocab + pad, 16, 12)
        with _impl_ctx(impl):
            res = run_fused(ws, wt, hs, ht, w, rank=0, world=1, group=None, vocab_size=vocab, dtype=dtype,
                            chunk=chunk, impl=impl, weighted=weighted)
        assert res[0].dtype == dtype  # fp32 in, fp32 out; fp64 stays fp64
        check([res], ws, wt, hs, ht, w, vocab_size=vocab, weighted=weighted, atol=tol, rtol=tol)


def test_bf16_within_tolerance():
    """bf16 weights/hidden: the matmul rounds logits to bf16 (as megatron's output layer does),
    stats run in fp32. Stated tolerance vs float64 math on the same bf16 inputs: 2% of each
    tensor's largest magnitude + 3% relative (measured: KL off by <= 0.041 on values up to 10.8,
    gradients by <= 0.024 on values up to 3.3 -- the bf16 rounding of logits and of dKL/dz,
    which today's path has too). Against today's bf16 path (logits = h W^T in bf16, then
    vocab_parallel_reverse_kl): KL and the hidden gradient identical, the weight gradient within
    one bf16 rounding (it is accumulated over chunks in fp32 and rounded once per chunk)."""
    vocab = 64
    ws, wt, hs, ht, w = make_inputs(24, vocab, 32, 16)
    ws, wt, hs, ht = (x.bfloat16().double() for x in (ws, wt, hs, ht))  # the inputs bf16 can hold
    res = run_fused(ws, wt, hs, ht, w, rank=0, world=1, group=None, vocab_size=vocab, dtype=torch.bfloat16,
                    chunk=8, impl="eager", weighted=True)
    assert res[0].dtype == torch.float32
    check([res], ws, wt, hs, ht, w, vocab_size=vocab, weighted=True, atol=2e-2, rtol=3e-2, scaled=True)
    h, W = hs.bfloat16().requires_grad_(True), ws.bfloat16().requires_grad_(True)
    kl = vocab_parallel_reverse_kl(h @ W.t(), ht.bfloat16() @ wt.bfloat16().t(), vocab_size=vocab, impl="eager")
    (kl * w.float()).sum().backward()
    assert torch.equal(res[0], kl.detach()) and torch.equal(res[1], h.grad)
    torch.testing.assert_close(res[2], W.grad, atol=1e-2 * W.grad.abs().max().item(), rtol=2**-7)


def test_equals_output_layer_then_reverse_kl():
    """Drop-in: same KL and gradients as logits = h W^T followed by vocab_parallel_reverse_kl."""
    ws, wt, hs, ht, w = make_inputs(19, 40, 8, 8, seed=3)
    ws, wt, hs, ht = (x.float() for x in (ws, wt, hs, ht))
    outs = []
    for fused in (True, False):
        h, W = hs.clone().requires_grad_(True), ws.clone().requires_grad_(True)
        if fused:
            kl = vocab_parallel_linear_reverse_kl(h, W, ht, wt, vocab_size=37, chunk_size=4, impl="eager")
        else:
            kl = vocab_parallel_reverse_kl(h @ W.t(), ht @ wt.t(), vocab_size=37, chunk_size=4, impl="eager")
        kl.sum().backward()
        outs.append((kl.detach(), h.grad, W.grad))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_tied_embedding_weight():
    """A tied model passes its embedding weight: both uses' gradients accumulate in one .grad."""
    ws, wt, hs, ht, _ = make_inputs(11, 30, 8, 8, seed=4)
    ids = torch.arange(11) % 30
    grads = []
    for fused in (True, False):
        emb = ws.clone().requires_grad_(True)
        h = torch.nn.functional.embedding(ids, emb) * 0.5 + hs  # the "model" reads the embedding
        if fused:
            kl = vocab_parallel_linear_reverse_kl(h, emb, ht, wt, vocab_size=30, impl="eager")
        else:
            kl = vocab_parallel_reverse_kl(h @ emb.t(), ht @ wt.t(), vocab_size=30, impl="eager")
        kl.sum().backward()
        grads.append(emb.grad)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-12, rtol=1e-12)


def test_teacher_no_grad_frozen_weight_no_grad_mode_and_empty():
    ws, wt, hs, ht, _ = make_inputs(6, 20, 8, 8)
    h, W = hs.clone().requires_grad_(True), ws.clone()  # frozen weight: only the hidden gradient
    t_h, t_w = ht.clone().requires_grad_(True), wt.clone().requires_grad_(True)
    vocab_parallel_linear_reverse_kl(h, W, t_h, t_w, vocab_size=20, impl="eager").sum().backward()
    assert h.grad is not None and W.grad is None and t_h.grad is None and t_w.grad is None
    with torch.no_grad():
        kl = vocab_parallel_linear_reverse_kl(h, ws.requires_grad_(True), ht, wt, vocab_size=20, impl="eager")
    assert not kl.requires_grad and kl.shape == (6,)
    # No kept token: still a graph, zero gradients (every rank takes part in backward).
    h0, W0 = hs[:0].clone().requires_grad_(True), ws.detach().clone().requires_grad_(True)
    kl0 = vocab_parallel_linear_reverse_kl(h0, W0, ht[:0], wt, vocab_size=20, impl="eager")
    kl0.sum().backward()
    assert kl0.shape == (0,) and h0.grad.shape == (0, 8) and (W0.grad == 0).all()


def test_second_backward_recomputes():
    ws, wt, hs, ht, _ = make_inputs(9, 20, 8, 8)
    h = hs.clone().requires_grad_(True)
    kl = vocab_parallel_linear_reverse_kl(h, ws, ht, wt, vocab_size=20, chunk_size=4, impl="eager")
    (g1,) = torch.autograd.grad(kl.sum(), h, retain_graph=True)
    (g2,) = torch.autograd.grad(kl.sum(), h)  # the forward-time gradient is gone: recompute path
    torch.testing.assert_close(g1, g2, atol=1e-12, rtol=1e-12)


def test_bad_inputs():
    ws, wt, hs, ht = (torch.randn(*s) for s in ((10, 4), (10, 3), (5, 4), (5, 3)))
    with pytest.raises(ValueError, match=r"student_hidden has 5 tokens, teacher_hidden 4"):
        vocab_parallel_linear_reverse_kl(hs, ws, ht[:4], wt, vocab_size=10)
    with pytest.raises(ValueError, match=r"same non-zero vocab rows.*\(10, 4\).*\(9, 3\)"):
        vocab_parallel_linear_reverse_kl(hs, ws, ht, wt[:9], vocab_size=10)
    with pytest.raises(ValueError, match=r"student hidden .*\(5, 4\) does not match its weight shard"):
        vocab_parallel_linear_reverse_kl(hs, ws.double(), ht, wt, vocab_size=10)
    with pytest.raises(ValueError, match=r"vocab_size=11 .*total shard width 10"):
        vocab_parallel_linear_reverse_kl(hs, ws, ht, wt, vocab_size=11)
    with pytest.raises(ValueError, match=r"impl='fast' is not one of"):
        vocab_parallel_linear_reverse_kl(hs, ws, ht, wt, vocab_size=10, impl="fast")


def test_peak_memory_flat_in_tokens():
    """Live-tensor peak (PeakMemory) of fwd+bwd minus the O(N*H) tensors does not grow with N,
    while the unfused path's grows with N*V."""
    vocab, hid, chunk = 4096, 16, 64

    def peak(n, fused):
        ws, wt, hs, ht, _ = make_inputs(n, vocab, hid, hid)
        ws, wt, hs, ht = (x.float() for x in (ws, wt, hs, ht))
        h, W = hs.requires_grad_(True), ws.requires_grad_(True)
        with PeakMemory() as m:
            if fused:
                kl = vocab_parallel_linear_reverse_kl(h, W, ht, wt, vocab_size=vocab, chunk_size=chunk, impl="eager")
            else:
                kl = vocab_parallel_reverse_kl(h @ W.t(), ht @ wt.t(), vocab_size=vocab, impl="eager")
            kl.sum().backward()
        return m.peak - 4 * n * (hid + 8)  # minus the [N, H] gradient and a few [N] fp32 vectors

    small, large = peak(128, True), peak(1024, True)
    assert large <= 1.3 * small, (small, large)
    assert peak(1024, False) > 4 * large  # today's path: [N, V] logits for both models + gradient
