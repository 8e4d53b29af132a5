"""Bytes and time: radix-select distributed top-k vs all-gathering every score (gloo, CPU).

    python tools/bench_topk_comm.py --n 1000000 --world 4 --ratio 0.5

Bytes are counted by wrapping torch.distributed.all_reduce / all_gather in each rank:
"payload" = bytes of the tensors a rank hands to each collective (what the algorithm
asks for; the wire traffic of ring/tree implementations is a small multiple of it).
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.distributed as dist

from megatron_tip.selection import distributed_topk_mask
from megatron_tip.launch import run_distributed

try:  # forked ranks inherit it instead of importing megatron in every teardown
    import megatron.core.parallel_state  # noqa: F401
except ImportError:
    pass


def _install_counter(log: list[tuple[str, int]]) -> None:
    ar, ag = dist.all_reduce, dist.all_gather

    def all_reduce(t, *a, **k):
        log.append(("all_reduce", t.numel() * t.element_size()))
        return ar(t, *a, **k)

    def all_gather(out, t, *a, **k):
        log.append(("all_gather", t.numel() * t.element_size()))
        return ag(out, t, *a, **k)

    dist.all_reduce, dist.all_gather = all_reduce, all_gather


def allgather_topk_mask(scores: torch.Tensor, valid: torch.Tensor, k: int, group) -> torch.Tensor:
    """Baseline: gather every rank's scores (invalid as -inf after a size exchange), sort."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([scores.numel()]), group=group)
    sizes = [int(s) for s in sizes]
    pad = max(sizes)
    s = torch.full((pad,), float("-inf"))
    s[: scores.numel()] = torch.where(valid, scores.float(), torch.full_like(scores, float("-inf")))
    outs = [torch.empty(pad) for _ in range(world)]
    dist.all_gather(outs, s, group=group)
    allv = torch.cat([o[:n] for o, n in zip(outs, sizes)])
    allvalid = allv > float("-inf")  # baseline assumes no -inf among valid scores
    idx = allvalid.nonzero().flatten()
    keep = idx[torch.sort(allv[idx], descending=True, stable=True).indices[:k]]
    lo = sum(sizes[:rank])
    mine = keep[(keep >= lo) & (keep < lo + scores.numel())] - lo
    mask = torch.zeros_like(valid)
    mask[mine] = True
    return mask


def _bench(rank, world, n, ratio, reps):
    log: list[tuple[str, int]] = []
    _install_counter(log)
    g = torch.Generator().manual_seed(rank)
    scores = torch.rand(n, generator=g)
    valid = torch.rand(n, generator=g) < 0.9
    n_valid = torch.tensor([int(valid.sum())])
    dist.all_reduce(n_valid)
    k = int(ratio * int(n_valid))
    out = {}
    for name, fn in (("radix", lambda: distributed_topk_mask(scores, valid, k, group=dist.group.WORLD)),
                     ("allgather", lambda: allgather_topk_mask(scores, valid, k, dist.group.WORLD))):
        fn()  # warm-up
        times = []
        for _ in range(reps):
            log.clear()
            dist.barrier()
            t = time.perf_counter()
            mask = fn()
            times.append(time.perf_counter() - t)
        out[name] = dict(time=min(times), calls=len(log), bytes=sum(b for _, b in log),
                         detail=list(log), kept=int(mask.sum()), mask=mask)
    same = torch.equal(out["radix"].pop("mask"), out["allgather"].pop("mask"))
    return out, same


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000, help="scores per rank")
    ap.add_argument("--world", type=int, default=4)
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args()
    res = run_distributed(_bench, a.world, a.n, a.ratio, a.reps, timeout=600)
    r0, same = res[0]
    print(f"N = {a.n:,} per rank x {a.world} ranks, keep ratio {a.ratio}; masks identical on all "
          f"ranks: {all(s for _, s in res)}")
    print(f"{'':22}{'radix select':>18}{'all-gather':>18}")
    for label, key, fmt in (("collectives / rank", "calls", "{:,}"), ("payload bytes / rank", "bytes", "{:,}"),
                            ("time (best of reps)", "time", "{:.4f} s")):
        print(f"{label:22}{fmt.format(r0['radix'][key]):>18}{fmt.format(r0['allgather'][key]):>18}")
    recv = (a.world - 1) * a.n * 4
    print(f"all-gather also receives {recv:,} B per rank of others' scores; radix select receives "
          f"the same small histograms it sends (kept {r0['radix']['kept']:,} on rank 0).")
    print("radix collectives:", ", ".join(f"{c}:{b}B" for c, b in r0["radix"]["detail"]))
    print(f"ratio all-gather/radix payload: {r0['allgather']['bytes'] / r0['radix']['bytes']:.0f}x")


if __name__ == "__main__":
    main()
