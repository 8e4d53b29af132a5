"""The multi-rank harness itself: results come back, failures and hangs fail fast."""
import pytest
import torch
import torch.distributed as dist

from megatron_tip.launch import RankFailure, run_distributed


def _allreduce(rank, world):
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    return t.item()


def test_results_per_rank():
    assert run_distributed(_allreduce, 3) == [6.0, 6.0, 6.0]


def _raise_on_1(rank, world):
    if rank == 1:
        raise ValueError("boom on rank 1")
    return rank


def test_failure_carries_traceback():
    with pytest.raises(RankFailure, match="boom on rank 1"):
        run_distributed(_raise_on_1, 2, timeout=60)


def _hang_on_0(rank, world):
    if rank == 0:
        dist.barrier()  # rank 1 never joins
    return rank


def test_hang_times_out():
    with pytest.raises(RankFailure, match="timed out|no result"):
        run_distributed(_hang_on_0, 2, timeout=8)
