"""init_parallel on a bad layout fails on every rank at once, not a hang."""
import pytest
from megatron_tip.launch import RankFailure, run_distributed


def _bad_init(rank, world):
    from megatron_tip.distributed import init_parallel

    init_parallel(2, pp=2)  # 4 needed, 3 available


def test_init_parallel_fails_fast_on_every_rank():
    with pytest.raises(RankFailure, match="world size 3 is not divisible"):
        run_distributed(_bad_init, 3, timeout=60)
