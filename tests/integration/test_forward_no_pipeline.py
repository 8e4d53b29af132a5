"""PP=1 runs micro-batches without megatron's pipeline schedule (issue #27); the reference is the
schedule itself (``forward_backward_no_pipelining``): same gradients, same reports, bit for bit, at
DP=2 with several micro-batches (deferred gradient sync, token counts through finalize_model_grads)."""
import pytest
import torch

from megatron_tip.launch import run_distributed
from tests.helpers.trainer_cases import make_pair, trainer_with_rollouts

pytestmark = pytest.mark.timeout(300)


def _schedule(model, microbatches, on_output, *, forward_only, prepare=None):
    import contextlib

    from megatron.core.pipeline_parallel import get_forward_backward_func

    def step(data_iter, m):
        mb = next(data_iter)
        with prepare(mb) if prepare is not None else contextlib.nullcontext():
            out = m(mb["input_ids"], mb["position_ids"], None)
        return out, lambda output: on_output(mb, output)

    b, s = microbatches[0]["input_ids"].shape
    return get_forward_backward_func()(forward_step_func=step, data_iterator=iter(microbatches), model=[model],
                                       num_microbatches=len(microbatches), seq_length=s, micro_batch_size=b,
                                       forward_only=forward_only)


def _grads_both_ways(rank, world, root, teacher, student):
    import megatron_tip.models.forward as fwd

    cfg, parts, trainer, packed = trainer_with_rollouts(root, teacher, student, **{"train.micro_batch_size": 1})
    out = {}
    for name in ("direct", "schedule"):
        if name == "schedule":
            fwd._run_without_pipeline = lambda model, mbs, on_output, **kw: _schedule(model, mbs, on_output, **kw)
        scored = trainer.score(packed)
        sel, _ = trainer.select(scored, 0)
        trainer.gradient_pass(scored, sel.mask, weights=sel.weights)
        out[name] = ({k: v.clone() for k, v in scored.stats.items()},
                     [p.main_grad.clone() for p in parts.student.parameters()])
    return out, len(scored.microbatches)


def test_direct_loop_equals_megatron_schedule(tmp_path):
    teacher, student = make_pair(tmp_path)
    for out, n_mb in run_distributed(_grads_both_ways, 2, tmp_path, teacher, student, timeout=240):
        assert n_mb > 1
        (s_stats, s_grads), (d_stats, d_grads) = out["schedule"], out["direct"]
        assert s_stats.keys() == d_stats.keys()
        for k in s_stats:
            assert torch.equal(s_stats[k], d_stats[k]), k
        assert any(g.abs().sum() > 0 for g in d_grads)
        for a, b in zip(s_grads, d_grads):
            assert torch.equal(a, b)
