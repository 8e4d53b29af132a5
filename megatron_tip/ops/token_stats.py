"""Vocab-parallel per-token statistics and the reverse-KL distillation loss.

Student and teacher logits arrive sharded along the vocabulary: rank r of ``tp_group``
holds global columns ``[r * V_local, (r + 1) * V_local)``. Everything here is exact and
never gathers the vocabulary: each rank reduces its shard to a few numbers per token and
two all-reduces per token chunk (one MAX, one SUM, each batched into a single tensor)
combine them.

Layout follows megatron-core ``tensor_parallel/cross_entropy.py``: a class of static math
steps (:class:`VocabParallelTokenStatsMath`), a private autograd Function with a
hand-written backward, and public functions taking ``tp_group=``. Unlike megatron's CE,
nothing here writes to the caller's tensors.

Math per token, with s = z_S - max z_S, t = z_T - max z_T (global maxima) over the true
vocabulary, Z_S = sum exp(s), Z_T = sum exp(t), d = s - t:
  H(P_S)          = log Z_S - <e^s, s> / Z_S
  H(P_T)          = log Z_T - <e^t, t> / Z_T
  KL(P_S || P_T)  = <e^s, d> / Z_S - log Z_S + log Z_T
  KL(P_T || P_S)  = -<e^t, d> / Z_T + log Z_S - log Z_T
  log p_S(y)      = s_y - log Z_S
d is formed before the dot product so identical student/teacher rows give KL == 0 exactly
and near-equal rows do not cancel two large numbers.
Gradient of KL(P_S || P_T) w.r.t. z_S: p_S * (log p_S - log p_T - KL); see the backward.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

import megatron_tip.ops.compiled as _compiled
from megatron_tip.ops.compiled import compute_dtype as _compute_dtype

# Target size of one fp32 work buffer [chunk, V_local]; the forward holds five of them.
# Buffers are allocated once per call and reused by every chunk, which avoids re-faulting
# fresh pages for each chunk (that, not arithmetic, dominated on CPU at 64 MiB chunks).
STATS_CHUNK_BYTES = 16 * 2**20


@dataclass
class TokenStats:
    """Per-token statistics, each of shape ``[...]`` (the logits' leading dims).

    Values are fp32 (fp64 when the inputs are fp64). ``norm_entropy`` = entropy / log(V_true).
    """

    entropy: torch.Tensor
    norm_entropy: torch.Tensor
    reverse_kl: torch.Tensor
    forward_kl: torch.Tensor
    teacher_entropy: torch.Tensor
    target_logprob: Optional[torch.Tensor] = None


class VocabParallelTokenStatsMath:
    """Static math steps on one token chunk of a vocabulary shard (fp32 work buffers)."""

    @staticmethod
    def local_max(zs: torch.Tensor, zt: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Write shard maxima of ``zs``/``zt`` [rows, v] into ``out`` [2, rows]; -inf if v == 0."""
        if zs.shape[-1] == 0:  # a rank whose whole shard is vocab padding
            return out.fill_(-math.inf)
        out[0] = zs.amax(dim=-1)  # max is exact in any dtype: no upcast needed
        out[1] = zt.amax(dim=-1)
        return out

    @staticmethod
    def shift_exp(z: torch.Tensor, zmax: torch.Tensor, shifted: torch.Tensor, expd: torch.Tensor) -> None:
        """shifted = z - max (upcast happens here, per chunk, via type promotion); expd = exp(shifted)."""
        torch.sub(z, zmax.unsqueeze(-1), out=shifted)
        torch.exp(shifted, out=expd)

    @staticmethod
    def partial_sums(sdt: torch.Tensor, es: torch.Tensor, et: torch.Tensor, out: torch.Tensor,
                     full: bool) -> torch.Tensor:
        """Fill ``out`` [6, rows] with shard partial sums Z_S, Z_T, <es,d>, <et,d>, <es,s>, <et,t>.

        ``sdt`` [rows, 3, v] holds s, t in slots 0, 2; d = s - t is written to slot 1 so that
        (s, d) and (d, t) are each one strided [v, 2] operand: one batched mat-vec reads ``es``
        (``et``) once for two dot products, with no [rows, v] temporary.
        ``full=False`` computes only Z_S, Z_T, <es,d> (reverse KL).
        """
        torch.sub(sdt[:, 0], sdt[:, 2], out=sdt[:, 1])
        torch.sum(es, dim=-1, out=out[0])
        torch.sum(et, dim=-1, out=out[1])
        if not full:
            torch.bmm(es.unsqueeze(1), sdt[:, 1].unsqueeze(2), out=out[2].view(-1, 1, 1))
            return out
        sd = torch.bmm(es.unsqueeze(1), sdt[:, 0:2].transpose(1, 2)).view(-1, 2)  # <es,s>, <es,d>
        dt = torch.bmm(et.unsqueeze(1), sdt[:, 1:3].transpose(1, 2)).view(-1, 2)  # <et,d>, <et,t>
        out[2], out[4] = sd[:, 1], sd[:, 0]
        out[3], out[5] = dt[:, 0], dt[:, 1]
        return out

    @staticmethod
    def combine(sums: torch.Tensor, log_v: float) -> dict[str, torch.Tensor]:
        """Turn globally reduced sums [>=6, rows] into per-token statistics."""
        zs, zt = sums[0], sums[1]
        lzs, lzt = zs.log(), zt.log()
        ent = lzs - sums[4] / zs
        return {
            "entropy": ent,
            "norm_entropy": ent / log_v if log_v > 0 else torch.zeros_like(ent),
            "reverse_kl": sums[2] / zs - lzs + lzt,
            "forward_kl": -sums[3] / zt + lzs - lzt,
            "teacher_entropy": lzt - sums[5] / zt,
            "log_zs": lzs,
        }


def _group_info(tp_group: Optional[dist.ProcessGroup]) -> tuple[int, int]:
    if tp_group is None:
        return 0, 1
    return dist.get_rank(group=tp_group), dist.get_world_size(group=tp_group)


def _validate(student: torch.Tensor, teacher: torch.Tensor, world: int,
              vocab_size: Optional[int]) -> int:
    """Check shapes/vocab and return the true vocab size."""
    if student.shape != teacher.shape:
        raise ValueError(
            f"student shard shape {tuple(student.shape)} != teacher shard shape {tuple(teacher.shape)}"
        )
    if student.dim() < 1 or student.shape[-1] == 0:
        raise ValueError(f"logit shards need a non-empty vocab dim, got shape {tuple(student.shape)}")
    if not (student.is_floating_point() and teacher.is_floating_point()):
        raise ValueError(f"logits must be floating point, got {student.dtype} and {teacher.dtype}")
    total = world * student.shape[-1]
    if vocab_size is None:
        return total
    if not 0 < vocab_size <= total:
        raise ValueError(
            f"vocab_size={vocab_size} is incompatible with the group's total shard width {total} "
            f"({world} ranks x shard shape {tuple(student.shape)}): need 0 < vocab_size <= {total}"
        )
    return int(vocab_size)


def _default_chunk(v_local: int, elem_bytes: int) -> int:
    """Default tokens per chunk. ``v_local`` is the (padded) shard width, equal on every rank: the
    chunk count decides how many all-reduces a rank issues, so it must not depend on the rank's
    number of valid columns (a short or empty last shard would issue fewer and hang the group)."""
    return max(1, STATS_CHUNK_BYTES // max(1, v_local * elem_bytes))


def _v_valid(v_local: int, vocab_size: int, rank: int) -> int:
    return max(0, min(v_local, vocab_size - rank * v_local))  # padding is a global suffix


def _forward(zs2, zt2, *, rank, world, tp_group, vocab_size, chunk_size, target_ids, full, impl):
    """Chunked forward over [N, V_local] views. Returns (stats dict of [N] tensors, saved [4, N])."""
    n, v_local = zs2.shape
    dtype = _compute_dtype(zs2, zt2)
    v_valid = _v_valid(v_local, vocab_size, rank)
    rows = chunk_size or _default_chunk(v_local, torch.finfo(dtype).bits // 8)
    if impl == "compiled" and n > 0:
        maxes, sums = _compiled.forward_sums(zs2, zt2, v_valid=v_valid, lo_id=rank * v_local, world=world,
                                             tp_group=tp_group, rows=rows, target_ids=target_ids, full=full)
    else:
        maxes, sums = _eager_sums(zs2, zt2, v_valid=v_valid, lo_id=rank * v_local, world=world,
                                  tp_group=tp_group, rows=max(1, min(rows, n)), target_ids=target_ids, full=full)
    stats = VocabParallelTokenStatsMath.combine(sums, math.log(vocab_size))
    if target_ids is not None:
        stats["target_logprob"] = sums[6] - stats["log_zs"]
    # What backward needs per token: both shifts (maxima, or lower bounds of them on the compiled
    # path) and both log-normalizers relative to them, kept separate
    # because max + log Z rounds to ~1e-3 at |logits| ~ 1e4 in fp32.
    saved = torch.stack([maxes[0], stats["log_zs"], maxes[1], sums[1].log()])
    return stats, saved


def _eager_sums(zs2, zt2, *, v_valid, lo_id, world, tp_group, rows, target_ids, full):
    """Eager chunk loop (reused fp32 work buffers): maxima [2, N] and global sums [6|7, N]."""
    n = zs2.shape[0]
    dtype = _compute_dtype(zs2, zt2)
    dev = zs2.device
    # Work buffers, reused by every chunk (the last chunk uses a prefix of the rows).
    sdt_buf = torch.empty(rows, 3, v_valid, dtype=dtype, device=dev)  # s, d, t (see partial_sums)
    exp_buf = torch.empty(2, rows, v_valid, dtype=dtype, device=dev)
    n_red = 7 if target_ids is not None else 6
    maxes = torch.empty(2, n, dtype=dtype, device=dev)
    sums = torch.empty(n_red, n, dtype=dtype, device=dev)
    # Per-chunk reduction buffers: all_reduce needs contiguous tensors.
    mx_buf = torch.empty(2 * rows, dtype=dtype, device=dev)
    sum_buf = torch.empty(n_red * rows, dtype=dtype, device=dev)
    hi_id = lo_id + v_valid
    m = VocabParallelTokenStatsMath
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        k = r1 - r0
        # Slicing off padding columns == masking them to -inf (exp -> 0), without a copy.
        zs, zt = zs2[r0:r1, :v_valid], zt2[r0:r1, :v_valid]
        mx = m.local_max(zs, zt, mx_buf[: 2 * k].view(2, k))
        if world > 1:
            dist.all_reduce(mx, op=dist.ReduceOp.MAX, group=tp_group)
        maxes[:, r0:r1] = mx
        sdt, es, et = sdt_buf[:k], exp_buf[0, :k], exp_buf[1, :k]
        s, t = sdt[:, 0], sdt[:, 2]
        m.shift_exp(zs, mx[0], s, es)
        m.shift_exp(zt, mx[1], t, et)
        out = sum_buf[: n_red * k].view(n_red, k)
        if v_valid == 0:
            out.zero_()
        else:
            m.partial_sums(sdt, es, et, out[:6], full)
            if not full:
                out[3:6].zero_()
        if target_ids is not None:
            # The owning rank contributes s_y (shifted by the global max); others add 0.
            tid = target_ids[r0:r1]
            own = (tid >= lo_id) & (tid < hi_id)
            local = (tid - lo_id).clamp(0, max(v_valid - 1, 0))
            picked = s.gather(1, local.unsqueeze(1)).squeeze(1) if v_valid else out[6]
            out[6] = torch.where(own, picked, torch.zeros((), dtype=dtype, device=dev))
        if world > 1:
            dist.all_reduce(out, op=dist.ReduceOp.SUM, group=tp_group)
        sums[:, r0:r1] = out
    return maxes, sums


def _eager_grad_into(grad, zs2, zt2, saved, kl, g, *, v_valid, rows):
    """Fill ``grad`` [N, V_local] with g * dKL/dz_S chunk by chunk (padding columns 0).

    ``saved`` [4, N] = (student max, log Z_S, teacher max, log Z_T); ``kl``, ``g`` [N].
    """
    n, dtype = zs2.shape[0], saved.dtype
    grad[:, v_valid:] = 0  # padding columns
    # log p - log q - KL = (s - t) - c with s, t the max-shifted logits and per-token
    # c = log Z_S - log Z_T + KL; p = exp(s) / Z_S. Folding 1/Z_S and dL/dKL into one
    # per-token factor keeps the chunk loop at six elementwise passes.
    gz = g / saved[1].exp()
    neg_cg = -(saved[1] - saved[3] + kl) * gz
    rows = max(1, min(n, rows))
    buf = torch.empty(2, rows, v_valid, dtype=dtype, device=zs2.device)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        s, d = buf[0, : r1 - r0], buf[1, : r1 - r0]
        torch.sub(zs2[r0:r1, :v_valid], saved[0, r0:r1, None], out=s)  # exact: no max + log Z sum
        torch.sub(zt2[r0:r1, :v_valid], saved[2, r0:r1, None], out=d)
        torch.sub(s, d, out=d)
        torch.addcmul(neg_cg[r0:r1, None], d, gz[r0:r1, None], out=d)  # ((s-t) - c) g / Z_S
        torch.mul(s.exp_(), d, out=grad[r0:r1, :v_valid])


class _VocabParallelReverseKL(torch.autograd.Function):
    """Reverse KL per token; exact gradient w.r.t. the student shard, none for the teacher.

    Saved for backward: references to the two input shards (no copies) and a [4, N] tensor
    (student max, log Z_S, teacher max, log Z_T) plus the [N] KL. Backward recomputes
    log p_S and log p_T per chunk locally: it needs no communication.
    """

    @staticmethod
    def forward(ctx, zs, zt, tp_group, vocab_size, chunk_size, impl):
        rank, world = _group_info(tp_group)
        v_local = zs.shape[-1]
        zs2, zt2 = zs.reshape(-1, v_local), zt.reshape(-1, v_local)
        stats, saved = _forward(zs2, zt2, rank=rank, world=world, tp_group=tp_group,
                                vocab_size=vocab_size, chunk_size=chunk_size,
                                target_ids=None, full=False, impl=impl)
        kl = stats["reverse_kl"]
        ctx.save_for_backward(zs, zt, saved, kl)
        ctx.rank, ctx.vocab_size, ctx.chunk_size, ctx.impl = rank, vocab_size, chunk_size, impl
        return kl.view(zs.shape[:-1])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        # dKL/dz_j = sum_i p_i (dlog p_i/dz_j)(1 + log p_i - log q_i)
        #          = p_j (log p_j - log q_j) - p_j sum_i p_i (log p_i - log q_i)
        #          = p_j (log p_j - log q_j - KL)     (the "+1" terms cancel since sum p = 1).
        # Padding columns have p_j = 0, so their gradient is 0.
        zs, zt, saved, kl = ctx.saved_tensors
        v_local = zs.shape[-1]
        zs2, zt2 = zs.reshape(-1, v_local), zt.reshape(-1, v_local)
        dtype = saved.dtype
        v_valid = _v_valid(v_local, ctx.vocab_size, ctx.rank)
        g = grad_out.reshape(-1).to(dtype)
        grad = torch.empty_like(zs2)
        rows = ctx.chunk_size or _default_chunk(v_local, torch.finfo(dtype).bits // 8)
        fill = _compiled.backward_into if ctx.impl == "compiled" else _eager_grad_into
        fill(grad, zs2, zt2, saved, kl, g, v_valid=v_valid, rows=rows)
        return grad.view(zs.shape), None, None, None, None, None


def vocab_parallel_token_stats(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    tp_group: Optional[dist.ProcessGroup] = None,
    vocab_size: Optional[int] = None,
    chunk_size: Optional[int] = None,
    target_ids: Optional[torch.Tensor] = None,
    impl: str = "auto",
) -> TokenStats:
    """Exact per-token entropy, reverse/forward KL and teacher entropy on vocab shards.

    Args:
        student_logits, teacher_logits: ``[..., V_local]`` shards, same shape, any float dtype;
            rank r of ``tp_group`` holds global columns ``[r*V_local, (r+1)*V_local)``.
        tp_group: tensor-parallel group; ``None`` = one process with the full vocabulary.
        vocab_size: true vocabulary; columns at or beyond it (padding) are excluded.
            Defaults to the total shard width.
        chunk_size: tokens per chunk (config key ``scoring.stats_chunk_size``; default: about
            :data:`STATS_CHUNK_BYTES` = 16 MiB of fp32 per work buffer, from the shard width).
        target_ids: ``[...]`` int64 global token ids; adds ``target_logprob`` = log p_S(id).
        impl: ``"eager"`` (chunked PyTorch ops), ``"compiled"`` (fused ``torch.compile`` kernel,
            see :mod:`megatron_tip.ops.compiled`) or ``"auto"`` (``$MEGATRON_TIP_OPS_IMPL``, else
            compiled for real vocabularies on CPU/CUDA). Both are exact to fp32 rounding.

    Returns:
        :class:`TokenStats` of ``[...]`` fp32 tensors; no autograd graph is recorded.
        All ranks of the group must call this with the same token layout.
    """
    rank, world = _group_info(tp_group)
    vocab_size = _validate(student_logits, teacher_logits, world, vocab_size)
    lead = student_logits.shape[:-1]
    tid = None
    if target_ids is not None:
        if tuple(target_ids.shape) != tuple(lead):
            raise ValueError(f"target_ids shape {tuple(target_ids.shape)} != logits leading shape {tuple(lead)}")
        tid = target_ids.reshape(-1).long()
        if tid.numel() and (int(tid.min()) < 0 or int(tid.max()) >= vocab_size):
            raise ValueError(f"target_ids must lie in [0, vocab_size={vocab_size})")
    v_local = student_logits.shape[-1]
    impl = _compiled.resolve_impl(impl, v_local=v_local, device=student_logits.device)
    with torch.no_grad():
        stats, _ = _forward(student_logits.reshape(-1, v_local), teacher_logits.reshape(-1, v_local),
                            rank=rank, world=world, tp_group=tp_group, vocab_size=vocab_size,
                            chunk_size=chunk_size, target_ids=tid, full=True, impl=impl)
    fields = ("entropy", "norm_entropy", "reverse_kl", "forward_kl", "teacher_entropy")
    out = {f: stats[f].view(lead) for f in fields}
    out["target_logprob"] = stats["target_logprob"].view(lead) if tid is not None else None
    return TokenStats(**out)


def vocab_parallel_reverse_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    tp_group: Optional[dist.ProcessGroup] = None,
    vocab_size: Optional[int] = None,
    chunk_size: Optional[int] = None,
    impl: str = "auto",
) -> torch.Tensor:
    """Per-token KL(P_S || P_T), ``[...]`` fp32, differentiable w.r.t. ``student_logits``.

    Shapes and arguments as in :func:`vocab_parallel_token_stats`. The teacher is a
    constant (no gradient). Backward memory: one ``[..., V_local]`` gradient plus two
    chunk-sized fp32 buffers; the inputs are referenced, not copied.
    """
    rank, world = _group_info(tp_group)
    vocab_size = _validate(student_logits, teacher_logits, world, vocab_size)
    impl = _compiled.resolve_impl(impl, v_local=student_logits.shape[-1], device=student_logits.device)
    return _VocabParallelReverseKL.apply(
        student_logits, teacher_logits.detach(), tp_group, vocab_size, chunk_size, impl
    )
