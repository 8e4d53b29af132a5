"""Run a function on N gloo ranks in forked processes, with a hard timeout.

A hung collective must fail the calling test, not stall CI: the parent waits at most
``timeout`` seconds, then kills every rank and raises with whatever tracebacks arrived.
"""
from __future__ import annotations

import io
import multiprocessing as mp
import os
import queue
import socket
import traceback
from datetime import timedelta
from typing import Any, Callable

_CTX = mp.get_context("fork")  # fork: closures work as targets, no re-import of torch/megatron


class RankFailure(RuntimeError):
    """Raised in the parent when a rank raised, died, or the group timed out."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(fn, rank, world_size, port, results, args, kwargs, init_dist: bool, collective_timeout):
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size),
    )
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        if init_dist:
            dist.init_process_group(
                "gloo", rank=rank, world_size=world_size,
                timeout=timedelta(seconds=collective_timeout),
            )
        out = fn(rank, world_size, *args, **kwargs)
        # Serialize to bytes: tensors sent as-is travel as shared-memory handles that die with
        # this process before the parent reads them.
        buf = io.BytesIO()
        torch.save(out, buf)
        results.put((rank, True, buf.getvalue()))
    except BaseException:  # noqa: BLE001 - ship every failure to the parent
        results.put((rank, False, traceback.format_exc()))
    finally:
        try:
            _teardown()
        except Exception:  # noqa: BLE001
            pass


def _teardown() -> None:
    import sys

    import torch.distributed as dist

    ps = sys.modules.get("megatron.core.parallel_state")  # never import megatron just to tear down
    if ps is not None:
        try:
            ps.destroy_model_parallel()
        except Exception:  # noqa: BLE001
            pass
    if dist.is_initialized():
        dist.destroy_process_group()


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 180.0,
    init_dist: bool = True,
    **kwargs: Any,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args, **kwargs)`` on ``world_size`` gloo ranks.

    Returns the per-rank return values (index = rank). Return values must be picklable
    (tensors are fine). Raises :class:`RankFailure` with each failing rank's traceback when
    any rank raised, exited without a result, or the group exceeded ``timeout`` seconds.
    """
    port = free_port()
    results = _CTX.Queue()
    procs = [
        _CTX.Process(
            target=_worker,
            args=(fn, r, world_size, port, results, args, kwargs, init_dist, max(timeout, 10)),
            daemon=False,  # ranks may start children (dist_checkpointing writers); we kill on timeout
        )
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    outs: dict[int, tuple[bool, Any]] = {}
    import time

    deadline = time.monotonic() + timeout
    try:
        while len(outs) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                rank, ok, val = results.get(timeout=min(remaining, 1.0))
                outs[rank] = (ok, val)
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if not p.is_alive() and r not in outs]
                if dead:
                    # Drain anything that arrived between the get() and the liveness check.
                    try:
                        while True:
                            rank, ok, val = results.get(timeout=0.5)
                            outs[rank] = (ok, val)
                    except queue.Empty:
                        pass
                    dead = [r for r in dead if r not in outs]
                    if dead:
                        for r in dead:
                            outs[r] = (False, f"rank {r} exited with code {procs[r].exitcode} and no result")
                        break
    finally:
        for p in procs:
            p.join(timeout=5 if len(outs) == world_size else 0.1)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
    failures = {r: v for r, (ok, v) in outs.items() if not ok}
    missing = [r for r in range(world_size) if r not in outs]
    if failures or missing:
        msg = [f"{len(failures)} rank(s) failed, {len(missing)} timed out after {timeout:.0f}s"]
        for r, tb in sorted(failures.items()):
            msg.append(f"--- rank {r} ---\n{tb}")
        if missing:
            msg.append(f"ranks without a result (hung or killed): {missing}")
        raise RankFailure("\n".join(msg))
    import torch

    return [torch.load(io.BytesIO(outs[r][1]), weights_only=False) for r in range(world_size)]
