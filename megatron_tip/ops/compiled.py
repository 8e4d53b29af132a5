"""Fused per-chunk kernels (``torch.compile``) for the vocab-parallel ops, and the impl switch.

Two kernels, each one pass over a ``[rows, v]`` chunk of both models' logits (inductor emits
vectorized C++ on CPU and Triton on CUDA; no ``[rows, v]`` temporaries):

* :func:`chunk_partials` -- shard-local shifts m (a cheap lower bound of the row max, or the
  max itself) and the sums relative to them (Z, <e^a, a-b>, ... with a, b the logits minus
  m). Relative to local shifts the kernel needs no communication, so the MAX all-reduce and
  the SUM all-reduce stay outside it (:func:`reduce_chunk` rescales by exp(m_local - m_global)
  in between, the online-softmax identity).
* :func:`rkl_grad` -- dKL/dz for one chunk: g * p_S * (s - t - c), written straight into the
  caller's gradient slice (or a new tensor).

Shapes are compiled statically (``dynamic=False``): callers run chunks of a fixed row count
(:func:`row_bucket` pads a short input up to one of four sizes), so one run compiles each
kernel at most four times per dtype. Compile time is recorded in :data:`COMPILE_LOG`.

Impl switch: ``impl="eager" | "compiled" | "auto"``; ``"auto"`` reads the environment variable
``MEGATRON_TIP_OPS_IMPL`` (same values) and otherwise picks ``compiled`` for vocabulary shards of
at least :data:`AUTO_MIN_VOCAB` columns on a device inductor supports, ``eager`` elsewhere (small
shapes: compiling costs more than it saves). A compile failure warns once; from then on the
kernel bodies run uncompiled (eager PyTorch ops) inside the same chunk loop, so every rank
still issues the same collectives.
"""
from __future__ import annotations

import math
import os
import sys
import time
import warnings
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

from megatron_tip.ops.impls import IMPLS

ENV_VAR = "MEGATRON_TIP_OPS_IMPL"
# Below this many columns per shard "auto" stays eager. Measured (docs/ops.md, "Fused kernels:
# measured"; tools/bench_token_stats.py, 2-core CPU): compiled is faster in steady state at every
# shape tried (stats 3.1x at 512x2048, 7.7x at 512x4096, 2.7-4.0x at 4096x32768 and 1024x151936;
# reverse-KL fwd+bwd 1.8-2.7x), but a cold compile costs 6-16 s per shape, and at 512x2048 a call
# saves ~10 ms: ~1000 calls to repay. Tiny vocabularies (tests, toy runs) therefore stay eager.
AUTO_MIN_VOCAB = 4096
# Shift = max over every SHIFT_STRIDE-th column (1 KiB apart in fp32: one cache line in 16 is read).
SHIFT_STRIDE = 256
SHIFT_LIMIT = 40.0
# (kernel name, shapes, dtypes, device) -> seconds of the first call (compile + one run).
COMPILE_LOG: dict[tuple, float] = {}
_state = {"broken": None}  # first compile error message, once one happened


def _drop_inherited_compile_pool() -> None:
    """After ``fork``, in the child: forget inductor's C++-compile thread pool inherited from the parent.

    Inductor compiles CPU kernels on a memoized ``ThreadPoolExecutor`` (``AsyncCompile.pool``) when
    ``compile_threads > 1``. A forked child inherits the executor object but none of its threads,
    and its idle-thread count says no new thread is needed, so the child's first C++ compile
    waits forever (torch resets only its process pools at fork). A rank forked by
    ``megatron_tip.launch`` after its parent compiled a kernel hung exactly so (issue #25).
    """
    ac = sys.modules.get("torch._inductor.async_compile")
    if ac is None:  # inductor never loaded in the parent: nothing inherited
        return
    pool = getattr(getattr(ac, "AsyncCompile", None), "pool", None)
    if hasattr(pool, "cache_clear"):
        pool.cache_clear()  # the child builds its own pool on its first compile
    else:  # a torch without that memoized pool: compile in-process, which needs no pool at all
        import torch._inductor.config as inductor_config

        inductor_config.compile_threads = 1


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_drop_inherited_compile_pool)


def resolve_impl(impl: str, *, v_local: int, device: torch.device) -> str:
    """Map ``impl`` (keyword, then ``$MEGATRON_TIP_OPS_IMPL``) to ``"eager"`` or ``"compiled"``.

    Depends only on values equal on all ranks of a group (the shard width, not the number of
    valid columns), because the two paths chunk differently and so issue different numbers
    of collectives.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r} is not one of {IMPLS}")
    if impl == "auto":
        env = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
        if env not in IMPLS:
            raise ValueError(f"environment variable {ENV_VAR}={env!r}: allowed values are {IMPLS}")
        impl = env
    if impl == "auto":
        impl = "compiled" if v_local >= AUTO_MIN_VOCAB and compile_supported(device) else "eager"
    return impl


def compile_supported(device: torch.device) -> bool:
    """Whether inductor has a backend for ``device`` here (CPU: always tried; CUDA: Triton)."""
    if device.type == "cpu":
        return True
    if device.type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            return False
        return True
    return False


def compute_dtype(*ts: torch.Tensor) -> torch.dtype:
    """fp32 accumulation at least; fp64 inputs stay fp64 (so gradcheck is meaningful)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in ts) else torch.float32


def row_bucket(n: int, rows: int) -> int:
    """Rows one kernel call processes: ``rows`` or, for short inputs, the smallest of
    rows/2, rows/4, rows/8 (rounded up) that holds ``n``."""
    for k in (8, 4, 2):
        b = max(1, math.ceil(rows / k))
        if n <= b:
            return b
    return rows


def chunk_starts(n: int, r: int) -> list[int]:
    """Start rows of ``r``-row chunks covering ``[0, n)`` when ``n >= r``; the last chunk ends at
    ``n`` and may overlap its predecessor (per-row results are recomputed identically)."""
    starts = list(range(0, n - r + 1, r))
    if starts[-1] + r < n:
        starts.append(n - r)
    return starts


# ---- kernel bodies (plain torch; compiled below, or run as-is as the fallback) -----------------

def _partials_body(zs: torch.Tensor, zt: torch.Tensor, full: bool, exact: bool) -> torch.Tensor:
    """[rows, v] x2 -> [8 (full) or 5, rows]: m_S, m_T, Z_a, Z_b, <e^a,d>[, <e^b,d>, <e^a,a>, <e^b,b>]
    with a = z_S - m_S, b = z_T - m_T and d = a - b formed before the products.

    The shifts m are the row maxima (``exact``) or the maxima of every ``SHIFT_STRIDE``-th column:
    any shift gives the same statistics after the rescaling in :func:`reduce_chunk`, and the
    subsampled one spares a full read of both chunks (the exact max is a separate,
    memory-bound pass). A shift far below the max overflows; :func:`_shift_ok` catches that.
    """
    dt = torch.float64 if torch.float64 in (zs.dtype, zt.dtype) else torch.float32
    zs, zt = zs.to(dt), zt.to(dt)
    step = 1 if exact else SHIFT_STRIDE
    ms, mt = zs[:, ::step].amax(-1, keepdim=True), zt[:, ::step].amax(-1, keepdim=True)
    a, b = zs - ms, zt - mt
    ea, eb = a.exp(), b.exp()
    d = a - b
    rows = [ms[:, 0], mt[:, 0], ea.sum(-1), eb.sum(-1), (ea * d).sum(-1)]
    if full:
        rows += [(eb * d).sum(-1), (ea * a).sum(-1), (eb * b).sum(-1)]
    return torch.stack(rows)


def _shift_ok(loc: torch.Tensor) -> bool:
    """Subsampled shifts are accepted when both local normalizers are finite and <= e^SHIFT_LIMIT,
    i.e. the max exceeds the shift by at most SHIFT_LIMIT: no overflow, and rounding errors
    grow only with |logit - shift| as they do with the exact max."""
    return bool((loc[2:4] <= math.exp(SHIFT_LIMIT)).all())  # False for inf and NaN


def _grad_into_body(out, zs, zt, ms, mt, lzs, c, g) -> None:
    """out = g * exp(s - log Z_S) * ((s - t) - c), s, t shifted by the global shifts; the
    per-row args are [rows, 1] in the compute dtype. One pass, written into ``out``."""
    dt = ms.dtype
    s, t = zs.to(dt) - ms, zt.to(dt) - mt
    out.copy_(g * (s - lzs).exp() * ((s - t) - c))


_KERNELS: dict[str, tuple[Callable, Optional[Callable]]] = {
    "partials": (_partials_body, None),
    "grad_into": (_grad_into_body, None),
}


def _call(name: str, *args, **static):
    """Run kernel ``name`` compiled; on the first call per shape, time it and catch compile errors."""
    body, compiled = _KERNELS[name]
    # Detached views: dynamo guards on requires_grad, and the same kernel serves inputs with and
    # without autograd history (no graph is recorded here either way; ``out`` shares storage).
    args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
    if _state["broken"] is not None or is_in_torch_dispatch_mode(include_infra_modes=False):
        # torch.compile refuses to run under a user TorchDispatchMode (e.g. the PeakMemory
        # tracker): run the same body as plain PyTorch ops there.
        return body(*args, **static)
    if compiled is None:
        compiled = torch.compile(body, dynamic=False, fullgraph=True)
        _KERNELS[name] = (body, compiled)
    key = (name,) + tuple((tuple(a.shape), tuple(a.stride()), a.dtype) if isinstance(a, torch.Tensor)
                          else a for a in args) + tuple(sorted(static.items())) + (str(args[0].device),)
    if key in COMPILE_LOG:
        return compiled(*args, **static)
    t0 = time.perf_counter()
    try:
        # Each (shape, dtype) is its own graph; lift dynamo's per-function limit of 8 for them.
        with torch._dynamo.config.patch(recompile_limit=64, accumulated_recompile_limit=512):
            out = compiled(*args, **static)
    except Exception as e:  # noqa: BLE001 - any compiler failure: eager from here on
        _state["broken"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        warnings.warn(f"megatron_tip.ops: torch.compile failed ({_state['broken']}); "
                      f"using the eager path from now on (set {ENV_VAR}=eager to silence)",
                      RuntimeWarning, stacklevel=3)
        return body(*args, **static)
    COMPILE_LOG[key] = time.perf_counter() - t0
    return out


def chunk_partials(zs: torch.Tensor, zt: torch.Tensor, *, full: bool) -> torch.Tensor:
    """Compiled :func:`_partials_body`: ``[rows, v]`` logits chunks -> ``[8 or 5, rows]``.

    Subsampled shifts first; the exact-max kernel (compiled on first need) when they overflow.
    """
    loc = _call("partials", zs, zt, full=full, exact=False)
    if not _shift_ok(loc):
        loc = _call("partials", zs, zt, full=full, exact=True)
    return loc


def rkl_grad(zs, zt, ms, mt, lzs, c, g, *, out: torch.Tensor) -> torch.Tensor:
    """Compiled reverse-KL gradient of one chunk ``[rows, v]`` written into ``out`` (same shape,
    any float dtype; e.g. a view of the caller's gradient). Per-row args are ``[rows, 1]``."""
    _call("grad_into", out, zs, zt, ms, mt, lzs, c, g)
    return out


def reduce_chunk(zs: torch.Tensor, zt: torch.Tensor, *, world: int, tp_group, full: bool,
                 target: Optional[tuple[torch.Tensor, torch.Tensor]] = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Global shifts ``[2, rows]`` and global sums ``[6 or 7, rows]`` of one chunk ``[rows, v]``.

    One MAX and one SUM all-reduce (outside the compiled kernel). The global shift M is the
    max over ranks of the local shifts (each <= its row max, so M <= the global max and
    exp(z - M - log Z) = p stays <= 1). Sums are relative to M, rows as in ``VocabParallelTokenStatsMath.partial_sums``: Z_S, Z_T, <e^s,d>,
    <e^t,d>, <e^s,s>, <e^t,t> (rows 3-5 zero unless ``full``), then s_y when ``target`` =
    (local column [rows], owned-by-this-rank mask [rows]) is given. A shard with no valid
    column (``v == 0``) contributes shift -inf and zero sums.
    """
    rows = zs.shape[0]
    dt = compute_dtype(zs, zt)
    sums = torch.zeros(6 + (target is not None), rows, dtype=dt, device=zs.device)
    if zs.shape[1] == 0:
        mx = torch.full((2, rows), -math.inf, dtype=dt, device=zs.device)
        loc = None
    else:
        loc = chunk_partials(zs, zt, full=full)
        mx = loc[:2].clone()
    if world > 1:
        dist.all_reduce(mx, op=dist.ReduceOp.MAX, group=tp_group)
    if loc is not None and world > 1:
        # Rescale shard sums from local to global shifts: e^s = e^{m - M} e^a, s = a + (m - M).
        off = loc[:2] - mx                      # [2, rows], <= 0
        f = off.exp()
        dl = off[0] - off[1]                    # d = s - t = (a - b) + dl
        sums[0], sums[1] = f[0] * loc[2], f[1] * loc[3]
        sums[2] = f[0] * (loc[4] + dl * loc[2])
        if full:
            sums[3] = f[1] * (loc[5] + dl * loc[3])
            sums[4] = f[0] * (loc[6] + off[0] * loc[2])
            sums[5] = f[1] * (loc[7] + off[1] * loc[3])
    elif loc is not None:
        sums[0:3] = loc[2:5]
        if full:
            sums[3:6] = loc[5:8]
    if target is not None and zs.shape[1] > 0:
        col, own = target
        picked = zs.gather(1, col.unsqueeze(1)).squeeze(1).to(dt) - mx[0]
        sums[6] = torch.where(own, picked, torch.zeros((), dtype=dt, device=zs.device))
    if world > 1:
        dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=tp_group)
    return mx, sums


def forward_sums(zs2: torch.Tensor, zt2: torch.Tensor, *, v_valid: int, lo_id: int, world: int,
                 tp_group, rows: int, target_ids: Optional[torch.Tensor], full: bool
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`reduce_chunk` over all rows of ``[N, V_local]`` shards -> shifts [2, N], sums [6|7, N].

    Chunks have a fixed row count (:func:`row_bucket`); the last one overlaps its predecessor,
    and an input shorter than the bucket is copied into a zero-padded ``[bucket, V_local]``
    buffer (same strides as the input, so the same compiled kernel serves both).
    """
    n = zs2.shape[0]
    dt = compute_dtype(zs2, zt2)
    r = row_bucket(n, rows)
    maxes = torch.empty(2, n, dtype=dt, device=zs2.device)
    sums = torch.empty(6 + (target_ids is not None), n, dtype=dt, device=zs2.device)
    if n < r:  # pad the rows; padded rows are computed and dropped
        zs_p = zs2.new_zeros(r, zs2.shape[1])
        zt_p = zt2.new_zeros(r, zt2.shape[1])
        zs_p[:n], zt_p[:n] = zs2, zt2
        tid = None
        if target_ids is not None:
            tid = target_ids.new_full((r,), lo_id)
            tid[:n] = target_ids
        mx, sm = forward_sums(zs_p, zt_p, v_valid=v_valid, lo_id=lo_id, world=world, tp_group=tp_group,
                              rows=r, target_ids=tid, full=full)
        return mx[:, :n].contiguous(), sm[:, :n].contiguous()
    for r0 in chunk_starts(n, r):
        sl = slice(r0, r0 + r)
        target = None
        if target_ids is not None:
            tid = target_ids[sl]
            own = (tid >= lo_id) & (tid < lo_id + v_valid)
            target = ((tid - lo_id).clamp(0, max(v_valid - 1, 0)), own)
        mx, sm = reduce_chunk(zs2[sl, :v_valid], zt2[sl, :v_valid], world=world, tp_group=tp_group,
                              full=full, target=target)
        maxes[:, sl], sums[:, sl] = mx, sm
    return maxes, sums


def backward_into(grad: torch.Tensor, zs2: torch.Tensor, zt2: torch.Tensor, saved: torch.Tensor,
                  kl: torch.Tensor, g: torch.Tensor, *, v_valid: int, rows: int) -> None:
    """Fill ``grad`` [N, V_local] with g * dKL/dz_S (padding columns 0); no communication.

    ``saved`` [4, N] = (student shift, log Z_S, teacher shift, log Z_T) with Z relative to the
    shifts (maxima on the eager path), ``kl`` and ``g`` [N].
    """
    n = zs2.shape[0]
    grad[:, v_valid:] = 0
    if v_valid == 0 or n == 0:
        return
    col = lambda x: x.contiguous().unsqueeze(1)  # noqa: E731  [N] -> [N, 1], one stride pattern
    c = saved[1] - saved[3] + kl    # log p - log q - KL = (s - t) - c
    args = [col(saved[0]), col(saved[2]), col(saved[1]), col(c), col(g)]
    r = row_bucket(n, rows)
    if n < r:  # pad rows into [r, V_local] buffers: same strides, same compiled kernel
        pad = lambda x: torch.cat([x, x.new_zeros(r - n, *x.shape[1:])])  # noqa: E731
        zs_p, zt_p = pad(zs2), pad(zt2)
        out = grad.new_empty(r, grad.shape[1])
        rkl_grad(zs_p[:, :v_valid], zt_p[:, :v_valid], *[pad(a) for a in args], out=out[:, :v_valid])
        grad[:, :v_valid] = out[:n, :v_valid]
        return
    for r0 in chunk_starts(n, r):
        sl = slice(r0, r0 + r)
        rkl_grad(zs2[sl, :v_valid], zt2[sl, :v_valid], *[a[sl] for a in args], out=grad[sl, :v_valid])
