"""Vocab-parallel token stats / reverse KL without a group vs a float64 reference; gradcheck; bad input."""
import pytest
import torch
from megatron_tip.ops import vocab_parallel_reverse_kl, vocab_parallel_token_stats
from tests.helpers.token_stats_cases import _check, _run_cases


def test_no_group_matches_reference():
    _check([_run_cases(0, 1, None)], 1)


def test_gradcheck_float64():
    g = torch.Generator().manual_seed(3)
    zs = torch.randn(5, 9, generator=g, dtype=torch.float64, requires_grad=True)
    zt = torch.randn(5, 9, generator=g, dtype=torch.float64)
    fn = lambda z: vocab_parallel_reverse_kl(z, zt, vocab_size=7, chunk_size=2)  # noqa: E731
    assert fn(zs).dtype == torch.float64  # fp64 inputs compute in fp64
    assert torch.autograd.gradcheck(fn, (zs,), eps=1e-6, atol=1e-7)


def test_teacher_gets_no_gradient():
    zs = torch.randn(4, 10, requires_grad=True)
    zt = torch.randn(4, 10, requires_grad=True)
    vocab_parallel_reverse_kl(zs, zt).sum().backward()
    assert zs.grad is not None and zt.grad is None


def test_bad_inputs():
    zs, zt = torch.randn(4, 10), torch.randn(4, 10)
    with pytest.raises(ValueError, match=r"\(4, 10\).*\(4, 11\)"):
        vocab_parallel_token_stats(zs, torch.randn(4, 11))
    with pytest.raises(ValueError, match=r"\(4, 10\).*\(3, 10\)"):
        vocab_parallel_reverse_kl(zs, torch.randn(3, 10))
    for bad in (11, 0, -2):
        with pytest.raises(ValueError, match=rf"vocab_size={bad}.*total shard width 10.*\(4, 10\)"):
            vocab_parallel_token_stats(zs, zt, vocab_size=bad)
    with pytest.raises(ValueError, match="target_ids shape"):
        vocab_parallel_token_stats(zs, zt, target_ids=torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="target_ids must lie"):
        vocab_parallel_token_stats(zs, zt, vocab_size=8, target_ids=torch.full((4,), 8))
