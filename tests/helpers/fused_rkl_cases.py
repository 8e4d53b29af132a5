"""Shared cases for the fused output-layer + reverse-KL tests: inputs and a float64 reference."""
from __future__ import annotations

import contextlib

import torch

from megatron_tip.ops import vocab_parallel_linear_reverse_kl


def make_inputs(n, v_total, h_s, h_t, seed=0):
    """Full-vocab weights [v_total, H] (padding rows included) and hidden states [n, H], fp64.

    Logits h W^T have std ~3 (like a trained LM head), teacher correlated with the student.
    """
    g = torch.Generator().manual_seed(seed)
    ws = torch.randn(v_total, h_s, generator=g, dtype=torch.float64) * (3 / h_s ** 0.5)
    wt = torch.randn(v_total, h_t, generator=g, dtype=torch.float64) * (3 / h_t ** 0.5)
    hs = torch.randn(n, h_s, generator=g, dtype=torch.float64)
    ht = torch.randn(n, h_t, generator=g, dtype=torch.float64)
    weights = torch.rand(n, generator=g, dtype=torch.float64)
    return ws, wt, hs, ht, weights


def reference(ws, wt, hs, ht, vocab_size, grad_w):
    """float64 full-vocab KL(P_S||P_T) [n] and the gradients of sum(grad_w * KL) w.r.t. hs, ws."""
    hs = hs.double().clone().requires_grad_(True)
    ws = ws.double().clone().requires_grad_(True)
    ls = torch.log_softmax((hs @ ws.t())[:, :vocab_size], -1)
    lt = torch.log_softmax((ht.double() @ wt.double().t())[:, :vocab_size], -1)
    kl = (ls.exp() * (ls - lt)).sum(-1)
    gh, gw = torch.autograd.grad((kl * grad_w.double()).sum(), (hs, ws))
    return kl.detach(), gh, gw


def run_fused(ws, wt, hs, ht, weights, *, rank, world, group, vocab_size, dtype, chunk, impl, weighted):
    """This rank's fused op on its weight shard; returns (kl, grad hidden, grad weight shard).

    ``weighted=False`` uses the loss 2.5 * sum(KL) (uniform dL/dKL: gradient formed in forward);
    ``True`` uses sum(w * KL) (per-token dL/dKL: backward recomputes the chunks).
    """
    width = ws.shape[0] // world
    sl = slice(rank * width, (rank + 1) * width)
    h = hs.to(dtype).clone().requires_grad_(True)
    w = ws[sl].to(dtype).clone().requires_grad_(True)
    t_h, t_w = ht.to(dtype).clone(), wt[sl].to(dtype).clone()
    before = [x.detach().clone() for x in (h, w, t_h, t_w)]
    kl = vocab_parallel_linear_reverse_kl(h, w, t_h, t_w, tp_group=group, vocab_size=vocab_size,
                                          chunk_size=chunk, impl=impl)
    loss = (kl * weights.to(kl.dtype)).sum() if weighted else 2.5 * kl.sum()
    loss.backward()
    # Never modify the caller's tensors, in forward or backward.
    assert all(torch.equal(a, b) for a, b in zip(before, (h.detach(), w.detach(), t_h, t_w)))
    assert h.grad.dtype == dtype and w.grad.dtype == dtype
    return kl.detach(), h.grad, w.grad


def check(results, ws, wt, hs, ht, weights, *, vocab_size, weighted, atol, rtol, scaled=False):
    """Compare per-rank results of :func:`run_fused` with the float64 reference.

    ``scaled=True``: ``atol`` is relative to each reference tensor's largest magnitude (bf16).
    """
    grad_w = weights if weighted else torch.full_like(weights, 2.5)
    kl_ref, gh_ref, gw_ref = reference(ws, wt, hs, ht, vocab_size, grad_w)

    def close(x, ref):
        tol = atol * ref.abs().max().item() if scaled else atol
        torch.testing.assert_close(x.double(), ref, atol=tol, rtol=rtol)

    for kl, gh, _ in results:
        close(kl, kl_ref)
        close(gh, gh_ref)  # the full gradient, summed over ranks
    gw = torch.cat([r[2] for r in results]).double()
    close(gw, gw_ref)
    assert (gw[vocab_size:] == 0).all()  # padding rows of the weight get no gradient


def extreme_logits(width_total, v):
    """[6, width_total] logits: |z| ~ 1e4, near one-hot rows (0-2), identical rows (1: KL must be
    exactly 0), a teacher that puts the student's argmax at -1e4 (2: huge KL); padding columns 0."""
    g = torch.Generator().manual_seed(1)
    zs = torch.randn(6, width_total, generator=g) * 1e4
    zt = zs + torch.randn(6, width_total, generator=g) * 1e-2
    hot = torch.randint(0, v, (6,), generator=g)
    zs[:3] = 0.0
    zs[torch.arange(3), hot[:3]] = 1e4
    zt[:3] = zs[:3].clone()
    zt[0, (hot[0] + 1) % v] = 1e4 - 5.0
    zt[1] = zs[1]
    zt[2] = -zs[2]
    zs[:, v:] = 0.0
    zt[:, v:] = 0.0
    return zs, zt


def check_extreme(st, kl, grad, zs, zt, v, reference):
    """Stats/KL/gradient of :func:`extreme_logits` vs the float64 ``reference`` (token_stats_cases)."""
    ref = reference(zs, zt, v, torch.zeros(6, dtype=torch.long), torch.ones(6))
    assert st.reverse_kl[1] == 0 and st.forward_kl[1] == 0 and kl[1] == 0
    assert st.reverse_kl[2] > 1e4 and torch.isfinite(grad).all()
    for f in ("entropy", "reverse_kl", "forward_kl", "teacher_entropy"):
        val = getattr(st, f)
        assert (val >= -1e-6).all(), (f, val)  # exact math, no clamping
        torch.testing.assert_close(val.double(), ref[f], atol=1e-5, rtol=1e-5, msg=f)
    torch.testing.assert_close(kl, st.reverse_kl)
    torch.testing.assert_close(grad.double(), ref["grad"], atol=1e-5, rtol=1e-4)


@contextlib.contextmanager
def kernels_uncompiled():
    """Run the compiled path's chunk loops with the kernel bodies as plain PyTorch (no inductor).

    Tests the loop logic (row buckets, overlapping last chunk, padding, the local-to-global
    rescaling between the two all-reduces) in seconds; inductor itself is tested separately.
    """
    import megatron_tip.ops.compiled as c

    kernels, log = dict(c._KERNELS), dict(c.COMPILE_LOG)
    c._KERNELS.update({k: (body, body) for k, (body, _) in kernels.items()})
    try:
        yield
    finally:
        c._KERNELS.clear()
        c._KERNELS.update(kernels)
        c.COMPILE_LOG.clear()
        c.COMPILE_LOG.update(log)
