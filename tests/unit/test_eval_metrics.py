"""mean@k / unbiased pass@k against brute-force enumeration of k-subsets."""
import itertools

import pytest

from megatron_tip.eval.metrics import aggregate, default_ks, pass_at_k, problem_metrics


def brute_pass_at_k(correct: list[bool], k: int) -> float:
    subsets = list(itertools.combinations(range(len(correct)), k))
    return sum(any(correct[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", [1, 2, 5, 8])
def test_pass_at_k_matches_enumeration(n):
    for c in range(n + 1):
        correct = [True] * c + [False] * (n - c)
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(brute_pass_at_k(correct, k), abs=1e-12)


def test_pass_at_1_is_mean_and_edge_cases():
    assert pass_at_k(16, 5, 1) == pytest.approx(5 / 16)
    assert pass_at_k(16, 0, 16) == 0.0
    assert pass_at_k(16, 1, 16) == 1.0
    assert 0.0 <= pass_at_k(1000, 3, 500) <= 1.0
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)


def test_default_ks():
    assert default_ks(16) == [1, 2, 4, 8, 16]
    assert default_ks(1) == [1]
    assert default_ks(6) == [1, 2, 4, 6]


def test_problem_and_aggregate():
    m = problem_metrics([True, False, False, True])
    assert m["mean"] == 0.5 and m["num_correct"] == 2
    assert m["pass@k"][4] == 1.0 and m["pass@k"][1] == 0.5
    agg = aggregate([[True, False], [False, False], [True, True]])
    assert agg["samples"] == 2 and agg["num_problems"] == 3
    assert agg["mean@2"] == pytest.approx(0.5)
    assert agg["pass@k"][1] == pytest.approx(0.5)
    assert agg["pass@k"][2] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="different sample counts"):
        aggregate([[True], [True, False]])
