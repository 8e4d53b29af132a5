"""Soft-OR, Q3 and quadrants on hand-computed examples (paper Eq. 7, §7.3, Table 1); config checks."""
import math

import pytest
import torch

from megatron_tip.selection import SelectionConfig, rank_normalize, select_tokens

# One rollout, five valid tokens and one padded slot (garbage that must be ignored).
H = torch.tensor([[0.0, 0.1, 0.2, 0.3, 1.0, float("nan")]])
RKL = torch.tensor([[0.5, 0.0, 1.0, 2.0, 0.0, 99.0]])
FKL = torch.tensor([[1.0, 2.0, 0.5, 0.0, 3.0, float("nan")]])
VALID = torch.tensor([[True, True, True, True, True, False]])
# torch.quantile linear: 98th pct of [0, .1, .2, .3, 1] = v3 + 0.92·(v4 − v3) at rank 0.98·4 = 3.92
CLIP = 0.3 + 0.92 * 0.7  # 0.944
H_HAT = [0.0, 0.1 / CLIP, 0.2 / CLIP, 0.3 / CLIP, 1.0]  # min 0, max after clip = CLIP
D_HAT = [0.25, 0.0, 0.5, 1.0, 0.0]                        # min 0, max 2, no clip


def _soft_or(h, d, valid):
    r = select_tokens(SelectionConfig(policy="topk", score="soft_or"), norm_entropy=h, reverse_kl=d,
                      forward_kl=torch.zeros_like(h), valid=valid)
    return r.scores


def test_soft_or_hand_example():
    s = _soft_or(H, RKL, VALID)
    expect = [h + d - h * d for h, d in zip(H_HAT, D_HAT)] + [0.0]
    torch.testing.assert_close(s, torch.tensor([expect]), rtol=1e-6, atol=1e-6)
    # Q3-ish token 2 (low h, high δ) outranks the pure low-entropy token 1 (Q4)
    assert s[0, 2] > s[0, 1]


def test_q3_score_and_quadrants_hand_example():
    cfg = SelectionConfig(policy="topk", score="q3", keep_ratio=0.4)
    r = select_tokens(cfg, norm_entropy=H, reverse_kl=RKL, forward_kl=FKL, valid=VALID)
    w = [f * (1 - h) for f, h in zip(FKL[0, :5].tolist(), H_HAT)]  # forward KL · (1 − ĥ)
    torch.testing.assert_close(r.scores, torch.tensor([w + [0.0]]), rtol=1e-6, atol=1e-6)
    assert r.mask[0].tolist() == [True, True, False, False, False, False]  # ⌊0.4·5⌋ = 2 best w
    # medians: h 0.2, δ 0.5; "high" = strictly above. (h, δ): (0,.5) Q4, (.1,0) Q4,
    # (.2,1) Q3, (.3,2) Q1, (1,0) Q2
    assert r.quadrant[0].tolist() == [4, 4, 3, 1, 2, 0]
    assert r.metrics["h_threshold"] == pytest.approx(0.2) and r.metrics["kl_threshold"] == 0.5
    assert r.metrics["h_clip"] == pytest.approx(CLIP, rel=1e-6)
    assert r.metrics["frac_q4"] == pytest.approx(0.4) and r.metrics["kept_frac_q4"] == 1.0
    fixed = SelectionConfig(policy="all", h_threshold=0.05, kl_threshold=0.0)
    q = select_tokens(fixed, norm_entropy=H, reverse_kl=RKL, forward_kl=FKL, valid=VALID)
    assert q.quadrant[0].tolist() == [3, 2, 1, 1, 2, 0]
    assert (q.metrics["h_threshold"], q.metrics["kl_threshold"]) == (0.05, 0.0)


def test_constant_inputs_normalize_to_zero():
    h = torch.full((2, 3), 0.3)
    s = _soft_or(h, torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.bool))
    assert torch.equal(s, torch.zeros(2, 3))


def test_rank_normalization_is_outlier_robust():
    x = torch.tensor([[0.1, 0.2, 0.3, 1e6]])
    v = torch.ones(1, 4, dtype=torch.bool)
    torch.testing.assert_close(rank_normalize(x, v), torch.tensor([[0.0, 1 / 3, 2 / 3, 1.0]]))
    tied = rank_normalize(torch.tensor([[0.5, 0.5, 0.7, 0.0]]), torch.tensor([[True, True, True, False]]))
    torch.testing.assert_close(tied, torch.tensor([[0.25, 0.25, 1.0, 0.0]]))  # mid-rank of ties


def test_inputs_unchanged_and_invalid_zeroed():
    g = torch.Generator().manual_seed(3)
    h, d, f = (torch.rand(3, 7, generator=g) for _ in range(3))
    v = torch.rand(3, 7, generator=g) < 0.6
    copies = [t.clone() for t in (h, d, f, v)]
    for pol in ("all", "topk", "bottomk", "entropy_sampling", "random", "quadrants"):
        for scope in ("per_sequence", "global"):
            r = select_tokens(SelectionConfig(policy=pol, scope=scope), norm_entropy=h,
                              reverse_kl=d, forward_kl=f, valid=v)
            assert not (r.mask & ~v).any() and not r.scores[~v].any() and not r.quadrant[~v].any()
            assert r.mask.dtype == torch.bool and r.scores.dtype == torch.float32
            assert r.quadrant.dtype == torch.int8
    for a, b in zip((h, d, f, v), copies):
        assert torch.equal(a, b)


@pytest.mark.parametrize("field,value", [
    ("policy", "best"), ("score", "hellinger"), ("keep_ratio", 0.0), ("keep_ratio", 1.5),
    ("scope", "batch"), ("min_keep_per_sequence", -1), ("normalization", "zscore"),
    ("entropy_clip_percentile", 0.0), ("quadrants", [5]), ("quadrants", []),
    ("h_threshold", math.nan), ("seed", 1.5),
])
def test_config_rejects_bad_fields(field, value):
    with pytest.raises(ValueError, match=f"SelectionConfig.{field}"):
        SelectionConfig(**{field: value})


def test_bad_shapes_rejected():
    with pytest.raises(ValueError, match="forward_kl has shape"):
        select_tokens(SelectionConfig(), norm_entropy=H, reverse_kl=RKL, forward_kl=FKL[:, :3], valid=VALID)
    with pytest.raises(ValueError, match="NaN"):
        select_tokens(SelectionConfig(), norm_entropy=H, reverse_kl=RKL, forward_kl=FKL,
                      valid=torch.ones_like(VALID))
