"""Fused output layer + reverse KL vs today's gradient pass: time and peak extra memory, one run.

Per kept-token count N and TP (gloo ranks forked with ``megatron_tip.launch.run_distributed``):
  today           what the gradient pass does now: both output layers at the kept positions
                  (``[N, V/TP]`` logits for student and teacher; the student's input gradient
                  all-reduced over TP in backward, as megatron's ColumnParallelLinear does), then
                  ``vocab_parallel_reverse_kl(impl="eager")``, ``kl.sum().backward()``.
  today_compiled  the same with ``impl="compiled"``: the gradient pass with
                  ``scoring.fused_output_layer=false`` and the default ``ops_impl`` on this machine.
  fused_eager     ``vocab_parallel_linear_reverse_kl(..., impl="eager")``, same loss.
  fused_compiled  the same with ``impl="compiled"`` (inductor kernels).
Student and teacher: hidden ``--hidden``, fp32, vocab ``--vocab`` padded to a multiple of 128*TP.

Each (method, N, TP) runs in fresh rank processes: inputs and weights are created, one warm-up
call on one chunk's worth of tokens compiles the kernels (time printed, not counted), then the
process's peak-RSS counter is reset (``/proc/self/clear_refs``) and one fwd+bwd call is timed.
"peak extra" = peak RSS during that call - RSS before it, max over ranks: everything the call
allocates (logits, buffers, gradients incl. the weight's, allocator slack), MiB resolution. The
O(N*H) part (the ``[N, H]`` input gradient) is listed separately. For the eager methods the live
tensor peak (``megatron_tip.testing.memory.PeakMemory``) of the same call is printed as a check.

    python tools/bench_fused_linear_rkl.py                     # N = 2k, 8k, 32k; TP = 1, 2
    python tools/bench_fused_linear_rkl.py --quick             # small smoke run
    python tools/bench_fused_linear_rkl.py --tokens --time-tokens 512   # interleaved best-of times only
"""
from __future__ import annotations

import argparse
import gc
import math
import os
import re
import time
import warnings

import torch
import torch.distributed as dist

warnings.simplefilter("ignore")  # megatron import warnings in forked ranks drown the table

import megatron_tip.ops.compiled as _compiled  # noqa: E402
from megatron_tip.launch import run_distributed  # noqa: E402
from megatron_tip.ops import vocab_parallel_linear_reverse_kl, vocab_parallel_reverse_kl  # noqa: E402
from megatron_tip.ops import fused_linear_rkl as _fused  # noqa: E402
from megatron_tip.testing.memory import PeakMemory  # noqa: E402

METHODS = ("today", "today_compiled", "fused_eager", "fused_compiled")


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+)", f.read()).group(1)) / 1024


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # Linux >= 4.0: reset VmHWM to the current RSS


class _CopyToTP(torch.autograd.Function):
    """Identity forward, all-reduce backward (megatron's copy_to_tensor_model_parallel_region)."""

    @staticmethod
    def forward(ctx, x):
        return x

    @staticmethod
    def backward(ctx, g):
        if dist.is_initialized() and dist.get_world_size() > 1:
            g = g.clone()
            dist.all_reduce(g)
        return g


def _loss(method, hs, ws, ht, wt, vocab, group):
    if method.startswith("today"):
        logits = _CopyToTP.apply(hs) @ ws.t()
        with torch.no_grad():
            t_logits = ht @ wt.t()
        impl = "compiled" if method == "today_compiled" else "eager"
        return vocab_parallel_reverse_kl(logits, t_logits, tp_group=group, vocab_size=vocab, impl=impl).sum()
    impl = method.split("_")[1]
    return vocab_parallel_linear_reverse_kl(hs, ws, ht, wt, tp_group=group, vocab_size=vocab, impl=impl).sum()


def _setup(rank, world, n, vocab, hidden, seed):
    """This rank's weight shards [V/TP, H] (student's requires grad), hidden states [N, H], chunk rows."""
    v_local = math.ceil(vocab / (128 * world)) * 128
    g = torch.Generator().manual_seed(seed + rank)
    scale = 3 / hidden ** 0.5  # logits with std ~3
    ws = torch.empty(v_local, hidden).normal_(generator=g).mul_(scale).requires_grad_(True)
    wt = torch.empty(v_local, hidden).normal_(generator=g).mul_(scale)
    g = torch.Generator().manual_seed(seed)  # hidden states are the same on every TP rank
    hs = torch.empty(n, hidden).normal_(generator=g).requires_grad_(True)
    ht = torch.empty(n, hidden).normal_(generator=g)
    return ws, wt, hs, ht, _fused._chunk_rows(n, v_local, None)


def _measure_times(rank, world, methods, n, vocab, hidden, seed, repeats):
    """All methods in one process per rank: warm-up on one chunk each, then ``repeats`` rounds of one
    call per method, interleaved; best of the rounds (robust to a shared, loaded machine)."""
    torch.set_num_threads(1)
    group = dist.group.WORLD if world > 1 else None
    ws, wt, hs, ht, rows = _setup(rank, world, n, vocab, hidden, seed)
    for method in methods:
        _loss(method, hs[:rows].detach().requires_grad_(True), ws, ht[:rows], wt, vocab, group).backward()
    best = {m: math.inf for m in methods}
    for _ in range(repeats):
        for method in methods:
            ws.grad = hs.grad = None
            if world > 1:
                dist.barrier()
            t0 = time.perf_counter()
            _loss(method, hs, ws, ht, wt, vocab, group).backward()
            best[method] = min(best[method], time.perf_counter() - t0)
    return best


def _time_table(a, methods) -> None:
    print(f"\ntime table: N={a.time_tokens}, best of {a.repeats} interleaved fwd+bwd calls per method (s, slowest rank)")
    base = [b for b in ("today", "today_compiled") if b in methods and "fused_compiled" in methods]
    print(f"{'N':>6} {'TP':>2} | " + " ".join(f"{m:>14}" for m in methods) + " | "
          + " ".join(f"{b}/fused_compiled" for b in base))
    for tp in a.tp:
        res = run_distributed(_measure_times, tp, methods, a.time_tokens, a.vocab, a.hidden, 0, a.repeats,
                              timeout=6 * 3600)
        t = {m: max(r[m] for r in res) for m in methods}
        ratio = " ".join(f"{t[b] / t['fused_compiled']:{len(b) + 15}.2f}" for b in base)
        print(f"{a.time_tokens:>6} {tp:>2} | " + " ".join(f"{t[m]:14.2f}" for m in methods) + f" | {ratio}",
              flush=True)


def _measure(rank, world, method, n, vocab, hidden, seed):
    torch.set_num_threads(1)
    group = dist.group.WORLD if world > 1 else None
    ws, wt, hs, ht, rows = _setup(rank, world, n, vocab, hidden, seed)
    t0 = time.perf_counter()
    _loss(method, hs[:rows].detach().requires_grad_(True), ws, ht[:rows], wt, vocab, group).backward()
    warm_s = time.perf_counter() - t0
    ws.grad = None
    gc.collect()
    base = _status_mib("VmRSS")
    _reset_peak_rss()
    tracker = PeakMemory() if not method.endswith("_compiled") else None
    if world > 1:
        dist.barrier()
    t0 = time.perf_counter()
    if tracker is not None:
        with tracker:
            _loss(method, hs, ws, ht, wt, vocab, group).backward()
    else:
        _loss(method, hs, ws, ht, wt, vocab, group).backward()
    elapsed = time.perf_counter() - t0
    peak = _status_mib("VmHWM") - base
    return {"s": elapsed, "peak_mib": peak, "live_mib": tracker.peak / 2**20 if tracker else math.nan,
            "warm_s": warm_s, "compile_s": sum(_compiled.COMPILE_LOG.values()), "rows": rows,
            "nh_mib": n * hidden * 4 / 2**20}


def _available_gib() -> float:
    with open("/proc/meminfo") as f:
        return int(re.search(r"MemAvailable:\s+(\d+)", f.read()).group(1)) / 2**20


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, nargs="*", default=[2048, 8192, 32768])
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--tp", type=int, nargs="*", default=[1, 2])
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--quick", action="store_true", help="N = 256, 1024 at V = 32768, hidden 256")
    p.add_argument("--time-tokens", type=int, default=0,
                   help="also (or, with --tokens none given, only) an interleaved best-of time table at this N")
    p.add_argument("--repeats", type=int, default=2, help="rounds of the time table")
    a = p.parse_args(argv)
    if a.quick:
        a.tokens, a.vocab, a.hidden = [256, 1024], 32768, 256
    methods = a.methods.split(",")
    if a.time_tokens:
        print(f"V={a.vocab} hidden={a.hidden} fp32, one thread per rank; {time.strftime('%Y-%m-%d %H:%M')}, "
              f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
        _time_table(a, methods)
        if not a.tokens:
            return
    print(f"V={a.vocab} hidden={a.hidden} fp32, one thread per rank; {time.strftime('%Y-%m-%d %H:%M')}, "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs, {_available_gib():.1f} GiB available")
    hdr = (f"{'N':>6} {'TP':>2} {'method':>14} | {'time s':>8} {'vs today':>8} | {'peak MiB':>9} {'-N*H MiB':>9} "
           f"{'vs today':>8} {'live MiB':>9} | {'rows':>5} {'warm-up s':>9} {'compile s':>9}")
    print(hdr)
    print("-" * len(hdr))
    flat = []
    for tp in a.tp:
        today, excl_of = {}, {}
        for n in a.tokens:
            for method in methods:
                v_local = math.ceil(a.vocab / (128 * tp)) * 128
                if method.startswith("today"):
                    need = tp * (3 * n * v_local + 3 * v_local * a.hidden) * 4 / 2**30  # logits x2 + grad, weights
                    if need > 0.8 * _available_gib():
                        print(f"{n:>6} {tp:>2} {method:>14} | skipped: needs ~{need:.1f} GiB, "
                              f"{_available_gib():.1f} GiB available", flush=True)
                        continue
                res = run_distributed(_measure, tp, method, n, a.vocab, a.hidden, 0, timeout=6 * 3600)
                r = {k: max(x[k] for x in res) for k in res[0]}
                excl = r["peak_mib"] - r["nh_mib"]
                excl_of.setdefault(method, []).append((n, excl))
                if method == "today":
                    today[n] = (r["s"], excl)
                t_ref, m_ref = today.get(n, (math.nan, math.nan))
                print(f"{n:>6} {tp:>2} {method:>14} | {r['s']:8.1f} {t_ref / r['s']:8.2f} | {r['peak_mib']:9.0f} "
                      f"{excl:9.0f} {m_ref / excl:8.2f} {r['live_mib']:9.0f} | {r['rows']:>5} {r['warm_s']:9.1f} "
                      f"{r['compile_s']:9.1f}", flush=True)
        for method, pts in excl_of.items():
            if len(pts) > 1:
                (n0, m0), (n1, m1) = pts[0], pts[-1]
                flat.append(f"TP={tp} {method}: peak-N*H at N={n1} / N={n0} = {m1 / m0:.2f}")
    print("\n".join(flat))
    print("time: one fwd+bwd call, slowest rank. vs today: today's time (memory) / this method's (>1 = better). "
          "peak MiB: peak RSS growth during the call, max over ranks; -N*H: minus the [N, H] fp32 input "
          "gradient. live MiB: PeakMemory live-tensor peak (eager methods). rows: tokens per chunk. "
          "warm-up s: first call on one chunk (compiles the kernels); compile s: inductor compile time.")


if __name__ == "__main__":
    main()
