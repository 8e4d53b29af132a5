"""Every tensor the package creates in the data path has an explicit device (issue #13).

A TP=2 and a PP=2 training step (rollouts with the megatron sampler, scoring, selection, gradient
pass, optimizer, metrics) and a held-out evaluation run under ``DeviceGuard``, which records each
tensor factory call made from package code without ``device=``. On CPU/gloo such a tensor works
by accident; on CUDA/NCCL it breaks the first collective or kernel.
"""
import pytest

from megatron_tip.launch import run_distributed
from tests.helpers.trainer_cases import make_pair, overrides

pytestmark = pytest.mark.timeout(600)


def _guarded_step(rank, world, tp, pp, argv):
    from megatron_tip.build import build
    from megatron_tip.config import load_config
    from megatron_tip.distributed import init_parallel
    from megatron_tip.testing.device_guard import DeviceGuard
    from megatron_tip.trainer import Trainer

    cfg = load_config(None, argv)
    ctx = init_parallel(tp, pp=pp)
    parts = build(cfg, ctx)
    trainer = Trainer(cfg, ctx, parts)
    policies = [{"selection.policy": "entropy_sampling"},
                {"selection.policy": "topk", "selection.scope": "global", "selection.normalization": "rank"},
                {"selection.policy": "quadrants"}, {"selection.policy": "random"}]
    losses = []
    with DeviceGuard() as guard:
        for step, pol in enumerate(policies):
            cfg.selection = load_config(None, [f"{k}={v}" for k, v in pol.items()]).selection
            losses.append(trainer.train_step(step).get("loss"))
        trainer.evaluate(parts.dataset, limit=2, temperature=0.0)
    return guard.violations, losses


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)], ids=["tp2", "pp2"])
def test_training_step_creates_no_tensor_without_a_device(tmp_path, tp, pp):
    teacher, student = make_pair(tmp_path)
    argv = overrides(tmp_path, teacher, student, **{"train.steps": 4})
    for violations, losses in run_distributed(_guarded_step, 2, tp, pp, argv, timeout=300):
        assert all(loss is not None and loss == loss for loss in losses)  # every step trained
        assert violations == [], "tensor factories without device=:\n" + "\n".join(violations)
