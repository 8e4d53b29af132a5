"""Test utilities shipped with the package so tests, tools and benchmarks share them."""
from megatron_tip.testing.spawn import RankFailure, run_distributed

__all__ = ["RankFailure", "run_distributed"]
