"""Fused output layer + exact reverse KL over vocabulary shards; logits exist one chunk at a time.

Drop-in for "student/teacher output layer at kept positions, then ``vocab_parallel_reverse_kl``":
``[N, V/TP]`` logits are never materialized. Per token chunk of ``rows`` tokens:

  z_S = h_S W_S[:v]^T, z_T = h_T W_T[:v]^T      (v = this shard's valid columns; padding rows of
                                                 the weight are never touched, their grad is 0)
  per-token shifts / sums -> KL                 (same chunk math and two all-reduces as
                                                 :mod:`megatron_tip.ops.token_stats`)
  G = dKL/dz_S (one fused pass)                 -> dh_S += G W_S[:v],  dW_S[:v] += G^T h_S

The gradient is computed in the forward pass, for ``dL/dKL = 1`` per token, while the chunk's
logits are at hand: backward then only scales it when ``dL/dKL`` is the same for every token
(the loss is a plain or scaled sum, as in megatron's per-token loss) -- 4 matmuls per chunk,
as many as the unfused path. For any other ``dL/dKL`` backward recomputes each chunk's logits
(6 matmuls). The hidden-state gradient is all-reduced over ``tp_group`` in backward (what
megatron's ColumnParallelLinear does for its input), so the op returns the full gradient.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

import megatron_tip.ops.compiled as _compiled
from megatron_tip.ops.compiled import compute_dtype
from megatron_tip.ops.token_stats import (
    _default_chunk,
    _eager_grad_into,
    _eager_sums,
    _group_info,
    _v_valid,
)

# Target size of one [rows, V_local] fp32 logits buffer; three such buffers live per chunk.
# 256 MiB (441 rows at V=151,936), not 64 MiB: the weight gradient is a rank-`rows` update of the
# whole [V_local, H] shard per chunk, so short chunks re-stream it. Measured fwd+bwd, N=880,
# H=1024, TP=1, CPU, best of 2 interleaved (docs/ops.md): unfused + compiled 23.0 s, fused
# 29.3 s at 110 rows, 24.5 s at 440 rows; extra memory stays flat in N (+0.6 GiB).
FUSED_CHUNK_BYTES = 256 * 2**20


def _chunk_rows(n: int, v_local: int, chunk_size: Optional[int]) -> int:
    rows = chunk_size or max(1, FUSED_CHUNK_BYTES // max(1, 4 * v_local))
    return _compiled.row_bucket(max(1, min(n, rows)), rows)


def _chunks(hs, ws, ht, wt, *, v_valid, rows, impl):
    """Yield (r0, k, z_S, z_T) with ``[rows, v_valid]`` logits buffers holding k fresh rows.

    Buffers are reused: rows past k keep stale finite values, so the compiled kernels always
    see the same shape and padding rows cost only elementwise work (no matmul).
    """
    n = hs.shape[0]
    zs_buf = hs.new_zeros(rows, v_valid, dtype=ws.dtype)
    zt_buf = ht.new_zeros(rows, v_valid, dtype=wt.dtype)
    ws_v, wt_v = ws[:v_valid], wt[:v_valid]
    for r0 in range(0, n, rows):
        k = min(rows, n - r0)
        torch.mm(hs[r0:r0 + k], ws_v.t(), out=zs_buf[:k])
        torch.mm(ht[r0:r0 + k], wt_v.t(), out=zt_buf[:k])
        if impl == "eager":
            yield r0, k, zs_buf[:k], zt_buf[:k]
        else:
            yield r0, k, zs_buf, zt_buf


def _pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    return x if x.shape[0] == rows else torch.cat([x, x.new_zeros(rows - x.shape[0], *x.shape[1:])])


def _chunk_grad(zs, zt, saved, kl, g, *, k, impl, out, v_local):
    """dL/dz_S of one chunk into ``out`` [rows, v]; returns its first k rows.

    ``saved`` [4, k], ``kl``, ``g`` [k]; the compiled kernel runs on all ``rows`` rows (the
    per-row values of rows >= k are zero-padded; those rows are dropped).
    """
    if impl == "eager":
        _eager_grad_into(out[:k], zs, zt, saved, kl, g, v_valid=zs.shape[1],
                         rows=_default_chunk(v_local, saved.element_size()))
        return out[:k]
    rows = zs.shape[0]
    c = saved[1] - saved[3] + kl
    col = [_pad_rows(x, rows).contiguous().unsqueeze(1) for x in (saved[0], saved[2], saved[1], c, g)]
    return _compiled.rkl_grad(zs, zt, *col, out=out)[:k]


def _accumulate(gl, r0, k, hs, ws_v, gh, gw_acc):
    """dh_S[r0:r0+k] = G W_S[:v]; dW_S[:v] += G^T h_S (G = ``gl`` [k, v])."""
    if gh is not None:
        torch.mm(gl, ws_v, out=gh[r0:r0 + k])
    if gw_acc is not None:
        acc = gw_acc[:gl.shape[1]]  # padding rows stay 0
        if acc.dtype == gl.dtype:
            acc.addmm_(gl.t(), hs[r0:r0 + k])
        else:  # low-precision weights: per-chunk product, fp32 accumulation across chunks
            acc.add_(torch.mm(gl.t(), hs[r0:r0 + k]))


class _LinearReverseKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hs, ws, ht, wt, tp_group, vocab_size, chunk_size, impl, need_gh, need_gw):
        rank, world = _group_info(tp_group)
        n, v_local = hs.shape[0], ws.shape[0]
        v_valid = _v_valid(v_local, vocab_size, rank)
        dt = compute_dtype(hs, ws, ht, wt)
        rows = _chunk_rows(n, v_local, chunk_size)
        if impl == "eager":  # eager uses only a chunk's k fresh rows: no bucket padding to allocate
            rows = max(1, min(rows, n))  # (the same chunks; at V=279 the bucket was 30k rows, 33 MB)
        saved = torch.empty(4, n, dtype=dt, device=hs.device)
        kl = torch.empty(n, dtype=dt, device=hs.device)
        gh = torch.empty_like(hs) if need_gh else None
        gw_acc = None
        if need_gw:
            acc_dt = ws.dtype if ws.dtype in (torch.float32, torch.float64) else torch.float32
            gw_acc = torch.zeros(v_local, ws.shape[1], dtype=acc_dt, device=ws.device)
        inner_rows = _default_chunk(v_local, torch.finfo(dt).bits // 8)
        one = torch.ones(rows, dtype=dt, device=hs.device)
        gl_buf = hs.new_empty(rows, v_valid, dtype=ws.dtype) if need_gh or need_gw else None
        for r0, k, zs, zt in _chunks(hs, ws, ht, wt, v_valid=v_valid, rows=rows, impl=impl):
            if impl == "eager":
                # Inner chunks from the shard width, not v_valid: every rank must run as many
                # chunks (each chunk is one MAX and one SUM all-reduce) even when its shard is
                # mostly or wholly vocab padding.
                mx, sums = _eager_sums(zs, zt, v_valid=v_valid, lo_id=rank * v_local, world=world,
                                       tp_group=tp_group, rows=min(k, inner_rows), target_ids=None, full=False)
            else:
                mx, sums = _compiled.reduce_chunk(zs, zt, world=world, tp_group=tp_group, full=False)
                mx, sums = mx[:, :k], sums[:, :k]
            lzs, lzt = sums[0].log(), sums[1].log()
            kl[r0:r0 + k] = sums[2] / sums[0] - lzs + lzt
            saved[:, r0:r0 + k] = torch.stack([mx[0], lzs, mx[1], lzt])
            if (need_gh or need_gw) and v_valid > 0:
                gl = _chunk_grad(zs, zt, saved[:, r0:r0 + k], kl[r0:r0 + k], one[:k], k=k, impl=impl,
                                 out=gl_buf, v_local=v_local)
                _accumulate(gl, r0, k, hs, ws[:v_valid], gh, gw_acc)
        if gh is not None and v_valid == 0:
            gh.zero_()
        gw = gw_acc if gw_acc is None or gw_acc.dtype == ws.dtype else gw_acc.to(ws.dtype)
        ctx.save_for_backward(hs, ws, ht, wt, saved, kl)
        ctx.grads = (gh, gw)  # for dL/dKL = 1; scaled (or recomputed) in backward
        ctx.args = (tp_group, world, v_valid, rows, impl, need_gh, need_gw)
        return kl

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_kl):
        hs, ws, ht, wt, saved, kl = ctx.saved_tensors
        tp_group, world, v_valid, rows, impl, need_gh, need_gw = ctx.args
        gh, gw = ctx.grads
        ctx.grads = (None, None)  # drop our references: autograd can take the tensors without a copy
        g = grad_kl.reshape(-1).to(saved.dtype)
        uniform = g.numel() == 0 or bool((g == g[0]).all())
        if uniform and (gh is not None or gw is not None or not (need_gh or need_gw)):
            scale = float(g[0]) if g.numel() else 1.0
            if scale != 1.0:
                for t in (gh, gw):
                    if t is not None:
                        t.mul_(scale)
        else:  # per-token weights (or a second backward): recompute each chunk's logits
            gh = torch.zeros_like(hs) if need_gh else None
            gw_acc = None
            if need_gw:
                acc_dt = ws.dtype if ws.dtype in (torch.float32, torch.float64) else torch.float32
                gw_acc = torch.zeros(ws.shape, dtype=acc_dt, device=ws.device)
            if v_valid > 0:
                gl_buf = hs.new_empty(rows, v_valid, dtype=ws.dtype)
                for r0, k, zs, zt in _chunks(hs, ws, ht, wt, v_valid=v_valid, rows=rows, impl=impl):
                    sl = slice(r0, r0 + k)
                    gl = _chunk_grad(zs, zt, saved[:, sl], kl[sl], g[sl], k=k, impl=impl, out=gl_buf,
                                     v_local=ws.shape[0])
                    _accumulate(gl, r0, k, hs, ws[:v_valid], gh, gw_acc)
            gw = gw_acc if gw_acc is None or gw_acc.dtype == ws.dtype else gw_acc.to(ws.dtype)
        if gh is not None and world > 1:
            dist.all_reduce(gh, op=dist.ReduceOp.SUM, group=tp_group)  # sum over vocab shards
        return gh, gw, None, None, None, None, None, None, None, None


def _validate(hs, ws, ht, wt, world, vocab_size) -> int:
    for name, t in (("student_hidden", hs), ("student_weight_shard", ws), ("teacher_hidden", ht),
                    ("teacher_weight_shard", wt)):
        if t.dim() != 2 or not t.is_floating_point():
            raise ValueError(f"{name} must be a 2-D floating-point tensor, got {t.dtype} {tuple(t.shape)}")
    if hs.shape[0] != ht.shape[0]:
        raise ValueError(f"student_hidden has {hs.shape[0]} tokens, teacher_hidden {ht.shape[0]}")
    if ws.shape[0] != wt.shape[0] or ws.shape[0] == 0:
        raise ValueError(f"weight shards need the same non-zero vocab rows: student {tuple(ws.shape)}, "
                         f"teacher {tuple(wt.shape)}")
    for h, w, who in ((hs, ws, "student"), (ht, wt, "teacher")):
        if h.shape[1] != w.shape[1] or h.dtype != w.dtype:
            raise ValueError(f"{who} hidden {h.dtype} {tuple(h.shape)} does not match its weight shard "
                             f"{w.dtype} {tuple(w.shape)} (need the same hidden size and dtype)")
    total = world * ws.shape[0]
    if not 0 < vocab_size <= total:
        raise ValueError(f"vocab_size={vocab_size} is incompatible with the group's total shard width {total} "
                         f"({world} ranks x {ws.shape[0]} weight rows): need 0 < vocab_size <= {total}")
    return int(vocab_size)


def vocab_parallel_linear_reverse_kl(
    student_hidden: torch.Tensor,
    student_weight_shard: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight_shard: torch.Tensor,
    *,
    tp_group: Optional[dist.ProcessGroup] = None,
    vocab_size: int,
    chunk_size: Optional[int] = None,
    impl: str = "auto",
) -> torch.Tensor:
    """Per-token KL(P_S || P_T) of ``softmax(h W^T)`` over the true vocabulary, ``[N]`` fp32.

    Args:
        student_hidden: ``[N, H_S]`` final hidden states at the scored positions (graph attached),
            identical on every rank of ``tp_group`` (no sequence parallelism).
        student_weight_shard: ``[V_local, H_S]`` output-layer weight shard of this rank (rows
            ``[r*V_local, (r+1)*V_local)``); for tied embeddings the embedding weight itself.
        teacher_hidden, teacher_weight_shard: ``[N, H_T]``, ``[V_local, H_T]``; constants.
        tp_group: tensor-parallel group; ``None`` = one process holding the whole vocabulary.
        vocab_size: true vocabulary; weight rows at or beyond it (padding) are excluded.
        chunk_size: tokens per logits chunk (config key ``scoring.fused_chunk_size``; default: a
            :data:`FUSED_CHUNK_BYTES` = 256 MiB fp32 ``[rows, V_local]`` buffer). The eager path
            splits each chunk further into the stats op's default chunks (16 MiB work buffers).
        impl: ``"auto" | "eager" | "compiled"``, as in :func:`vocab_parallel_token_stats`.

    Returns ``[N]`` (fp64 if any input is fp64). Backward gives exact gradients for
    ``student_hidden`` (summed over the group) and ``student_weight_shard`` (this shard's
    rows, ``.grad`` in the weight's dtype); none for the teacher. Extra memory is a few
    ``[rows, V_local]`` buffers plus ``[N, H_S]`` and one weight-shaped gradient, flat in N.
    """
    rank, world = _group_info(tp_group)
    hs, ws, ht, wt = student_hidden, student_weight_shard, teacher_hidden.detach(), teacher_weight_shard.detach()
    vocab_size = _validate(hs, ws, ht, wt, world, vocab_size)
    impl = _compiled.resolve_impl(impl, v_local=ws.shape[0], device=hs.device)
    grad_on = torch.is_grad_enabled()
    need_gh, need_gw = grad_on and hs.requires_grad, grad_on and ws.requires_grad
    return _LinearReverseKL.apply(hs, ws, ht, wt, tp_group, vocab_size, chunk_size, impl, need_gh, need_gw)
