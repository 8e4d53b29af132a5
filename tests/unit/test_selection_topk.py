"""Top-k mask and order-preserving keys in one process vs a sort-based reference."""
import pytest
import torch
from megatron_tip.selection import distributed_topk_mask
from megatron_tip.selection.topk import key_to_float, ordered_key
from tests.helpers.topk_cases import ref_topk_mask


def test_topk_single_process_fuzz():
    g = torch.Generator().manual_seed(0)
    for t in range(200):
        n = int(torch.randint(0, 60, (1,), generator=g))
        s = torch.randint(-3, 4, (n,), generator=g).float() if t % 2 else torch.randn(n, generator=g)
        v = torch.rand(n, generator=g) < 0.7
        k = int(torch.randint(0, n + 2, (1,), generator=g))
        m = distributed_topk_mask(s, v, k)
        assert torch.equal(m, ref_topk_mask(s, v, k))
        assert int(m.sum()) == min(k, int(v.sum()))
        # the kept values are exactly torch.topk's values
        kk = min(k, int(v.sum()))
        assert torch.equal(s[m].sort().values, torch.topk(s[v], kk).values.sort().values)


def test_ordered_key_roundtrip_and_order():
    x = torch.tensor([-float("inf"), -3e38, -1.0, -1e-45, 0.0, 1e-45, 2.5, 3e38, float("inf")])
    key = ordered_key(x)
    assert torch.all(key[1:] > key[:-1])
    assert [key_to_float(int(k), 32) for k in key] == x.tolist()
    assert ordered_key(torch.tensor([-0.0])) == ordered_key(torch.tensor([0.0]))


def test_topk_bad_args():
    with pytest.raises(ValueError, match="k must be"):
        distributed_topk_mask(torch.zeros(3), torch.ones(3, dtype=torch.bool), -1)
    with pytest.raises(ValueError, match="1-D"):
        distributed_topk_mask(torch.zeros(3), torch.ones(4, dtype=torch.bool), 1)
    with pytest.raises(ValueError, match="NaN"):
        distributed_topk_mask(torch.tensor([1.0, float("nan")]), torch.ones(2, dtype=torch.bool), 1)
