"""scoring.one_student_forward (issue #27): the gradient pass backpropagates through the scoring
forward's graph instead of running a second student forward. The reference is the two-forward path
(itself checked against megatron's schedule, test_forward_no_pipeline.py): same token statistics and
the same gradients, at DP=2 and at TP=2 with several micro-batches, for Soft-OR top-50% and all-token selection."""
import dataclasses

import pytest
import torch

from megatron_tip.launch import run_distributed
from tests.helpers.trainer_cases import make_pair, trainer_with_rollouts

pytestmark = pytest.mark.timeout(300)


def _grads_both_ways(rank, world, root, teacher, student, tp):
    cfg, parts, trainer, packed = trainer_with_rollouts(root, teacher, student, tp=tp,
                                                        **{"train.micro_batch_size": 1})
    out = {}
    for policy in ("topk", "all"):
        for one in (False, True):
            trainer.cfg.scoring = dataclasses.replace(cfg.scoring, one_student_forward=one)
            trainer.cfg.selection = dataclasses.replace(cfg.selection, policy=policy)
            scored = trainer.score(packed)
            assert (scored.student_hidden is not None) == one
            sel, _ = trainer.select(scored, 0)
            trainer.gradient_pass(scored, sel.mask, weights=sel.weights)
            out[policy, one] = ({k: v.clone() for k, v in scored.stats.items()},
                                [p.main_grad.clone() for p in parts.student.parameters()], sel.mask.sum().item())
    return out, len(scored.microbatches)


@pytest.mark.parametrize("tp", [1, 2], ids=["dp2", "tp2"])
def test_one_student_forward_equals_two(tmp_path, tp):
    teacher, student = make_pair(tmp_path)
    for out, n_mb in run_distributed(_grads_both_ways, 2, tmp_path, teacher, student, tp, timeout=240):
        assert n_mb > 1
        for policy in ("topk", "all"):
            (r_stats, r_grads, r_kept), (o_stats, o_grads, o_kept) = out[policy, False], out[policy, True]
            assert r_kept == o_kept > 0
            for k in r_stats:
                torch.testing.assert_close(o_stats[k], r_stats[k], rtol=0, atol=1e-6, msg=k)
            assert any(g.abs().sum() > 0 for g in o_grads)
            for a, b in zip(r_grads, o_grads):
                torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)
        assert out["topk", True][2] < out["all", True][2]  # the two policies train on different sets
