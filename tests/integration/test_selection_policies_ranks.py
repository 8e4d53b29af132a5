"""select_tokens over 2-4 gloo ranks equals the single-process result; NaN raises on every rank."""
import math
import pytest
import torch
import torch.distributed as dist
from megatron_tip.selection import SelectionConfig, select_tokens
from megatron_tip.launch import RankFailure, run_distributed
from tests.helpers.selection_cases import batch, run


CONFIGS = [
    SelectionConfig(policy="topk", score="soft_or", keep_ratio=0.5),
    SelectionConfig(policy="topk", score="soft_or", keep_ratio=0.3, scope="global"),
    SelectionConfig(policy="topk", score="q3", keep_ratio=0.2, normalization="rank", scope="global"),
    SelectionConfig(policy="bottomk", score="entropy", keep_ratio=0.5, min_keep_per_sequence=3),
    SelectionConfig(policy="entropy_sampling", keep_ratio=0.5, seed=3),
    SelectionConfig(policy="entropy_sampling", keep_ratio=0.4, scope="global", seed=3),
    SelectionConfig(policy="random", keep_ratio=0.3, scope="global"),
    SelectionConfig(policy="quadrants", quadrants=[3], h_threshold=0.4),
    SelectionConfig(policy="all", entropy_clip_percentile=90.0),
]


ROWS = {2: [0, 9], 3: [4, 0, 5], 4: [2, 3, 1, 3]}  # rollouts per rank (9 in all; an empty rank)


def _select_slice(rank, world):
    h, d, f, v = batch(B=9, S=12, seed=5)
    lo = sum(ROWS[world][:rank])
    sl = slice(lo, lo + ROWS[world][rank])
    out = []
    for cfg in CONFIGS:
        r = select_tokens(cfg, norm_entropy=h[sl], reverse_kl=d[sl], forward_kl=f[sl], valid=v[sl],
                          group=dist.group.WORLD, step=2)
        out.append((r.mask, r.scores, r.quadrant, r.metrics))
    return out


@pytest.mark.parametrize("world", [2, 3, 4])
def test_multi_rank_equals_single_process(world):
    h, d, f, v = batch(B=9, S=12, seed=5)
    ref = [run(cfg, h, d, f, v, step=2) for cfg in CONFIGS]
    res = run_distributed(_select_slice, world, timeout=120)
    for c, r1 in enumerate(ref):
        mask = torch.cat([res[r][c][0] for r in range(world)])
        scores = torch.cat([res[r][c][1] for r in range(world)])
        quad = torch.cat([res[r][c][2] for r in range(world)])
        assert torch.equal(mask, r1.mask), CONFIGS[c]
        assert torch.equal(quad, r1.quadrant) and torch.equal(scores, r1.scores), CONFIGS[c]
        for r in range(world):
            for k, val in res[r][c][3].items():  # metrics identical on every rank (NaN: h_clip, rank)
                assert val == res[0][c][3][k] or (math.isnan(val) and math.isnan(res[0][c][3][k]))
        assert res[0][c][3].keys() == r1.metrics.keys()
        for k, val in r1.metrics.items():
            assert res[0][c][3][k] == pytest.approx(val, rel=1e-12, nan_ok=True), k


def _nan_rank(rank, world):
    h, d, f, v = batch(B=2, S=6, seed=rank)
    if rank == 2:
        h, d, v = h.nan_to_num(0.1), d.clone(), v.clone()
        v[0, 0], d[0, 0] = True, float("nan")
    select_tokens(SelectionConfig(), norm_entropy=h, reverse_kl=d, forward_kl=f, valid=v,
                  group=dist.group.WORLD)


def test_nan_rejected_on_every_rank():
    with pytest.raises(RankFailure) as e:
        run_distributed(_nan_rank, 3, timeout=60)
    assert str(e.value).startswith("3 rank(s) failed, 0 timed out")
    assert str(e.value).count("select_tokens: NaN at valid positions") == 3
