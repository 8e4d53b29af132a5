"""megatron-core really runs TP / PP / DP and dist_checkpointing on CPU (gloo).

Every layout is compared against the single-process TP=1 result on the same weights.
"""
import pytest
import torch

from megatron_tip.launch import run_distributed
from tests.helpers.megatron_cases import (SPEC, build_layout, forward_backward, main_grads, make_batch,
                            reference_weights, wrap_ddp)

pytestmark = pytest.mark.timeout(300)


def _ref(rank, world):
    full = reference_weights()
    from megatron_tip.distributed import init_parallel

    ctx = init_parallel(1)
    model = wrap_ddp(build_layout(ctx, full))
    ids, labels = make_batch()
    loss = forward_backward(model, ids, labels)
    from megatron_tip.models.sharding import gather_canonical_state_dict

    return full, loss, gather_canonical_state_dict(model.module, vocab_size=SPEC.vocab_size,
                                                   tensors=main_grads(model))


@pytest.fixture(scope="module")
def reference():
    return run_distributed(_ref, 1)[0]


def _layout(rank, world, tp, pp, full):
    from megatron_tip.distributed import init_parallel
    from megatron_tip.models.sharding import gather_canonical_state_dict, layer_offset

    ctx = init_parallel(tp, pp=pp)
    model = wrap_ddp(build_layout(ctx, full))
    ids, labels = make_batch()
    loss = forward_backward(model, ids, labels)
    g = gather_canonical_state_dict(
        model.module, tp_group=ctx.tp_group, vocab_size=SPEC.vocab_size, tensors=main_grads(model),
        layer_offset=layer_offset(SPEC.num_layers, pp=pp, pp_rank=ctx.pp_rank))
    return loss, g


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2), (2, 2)])
def test_layout_matches_tp1(reference, tp, pp):
    full, ref_loss, ref_grads = reference
    results = run_distributed(_layout, tp * pp, tp, pp, full)
    losses = [r[0] for r in results if r[0] is not None]
    assert losses, "no rank reported a loss"
    for loss in losses:
        assert abs(loss - ref_loss) < 1e-5, (loss, ref_loss)
    merged: dict = {}
    for _, g in results:
        merged.update(g)
    assert set(merged) == set(ref_grads)
    for name, ref in ref_grads.items():
        torch.testing.assert_close(merged[name], ref, atol=1e-5, rtol=1e-4, msg=name)


def _ddp(rank, world, full, dp):
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from megatron_tip.distributed import init_parallel

    ctx = init_parallel(1)
    model = wrap_ddp(build_layout(ctx, full))
    opt = get_megatron_optimizer(OptimizerConfig(optimizer="sgd", lr=0.5, weight_decay=0.1,  # sgd: no sign-flips of ~0 grads
                                                 clip_grad=1.0, bf16=False), [model])
    ids, labels = make_batch()
    n = ids.shape[0] // dp  # each DP rank takes its slice of the same global batch
    model.zero_grad_buffer()
    opt.zero_grad()
    from megatron.core.pipeline_parallel import get_forward_backward_func

    pos = torch.arange(ids.shape[1]).unsqueeze(0).expand(n, -1)

    def step(data_iter, m):
        x, y = next(data_iter)
        out = m(x, pos, None, labels=y)
        return out, lambda t: (t.float().mean(), {})

    get_forward_backward_func()(
        forward_step_func=step, data_iterator=iter([(ids[rank * n:(rank + 1) * n], labels[rank * n:(rank + 1) * n])]),
        model=[model], num_microbatches=1, seq_length=ids.shape[1], micro_batch_size=n)
    ok, grad_norm, _ = opt.step()
    assert ok
    return {k: v.detach().clone() for k, v in model.module.state_dict().items() if "_extra_state" not in k}, grad_norm


def test_ddp_dp2_matches_single_process(reference):
    full = reference[0]
    dp2 = run_distributed(_ddp, 2, full, 2)
    dp1 = run_distributed(_ddp, 1, full, 1)[0]
    (sd0, gn0), (sd1, gn1) = dp2
    changed = False
    for k in sd0:
        assert torch.equal(sd0[k], sd1[k]), f"DP ranks diverged at {k}"
        torch.testing.assert_close(sd0[k], dp1[0][k], atol=1e-5, rtol=1e-4, msg=k)
        changed |= not torch.equal(sd0[k], full.get(k, sd0[k]))
    assert changed, "optimizer step changed nothing"
    assert abs(gn0 - dp1[1]) < 1e-4 * max(1.0, dp1[1])


def _save(rank, world, full, path):
    from megatron.core import dist_checkpointing

    from megatron_tip.distributed import init_parallel

    ctx = init_parallel(2)
    model = build_layout(ctx, full)
    dist_checkpointing.save(model.sharded_state_dict(), path)
    ids, labels = make_batch()
    return forward_backward(model, ids, labels, forward_only=True)


def _load(rank, world, tp, pp, path):
    from megatron.core import dist_checkpointing

    from megatron_tip.distributed import init_parallel
    from megatron_tip.models import build_gpt_model

    ctx = init_parallel(tp, pp=pp)
    model = build_gpt_model(SPEC, tp=tp, pp=pp, pp_rank=ctx.pp_rank)  # fresh random weights
    state = dist_checkpointing.load(model.sharded_state_dict(), path)
    model.load_state_dict(state)
    ids, labels = make_batch()
    return forward_backward(model, ids, labels, forward_only=True)


def test_dist_checkpoint_tp2_reloads_at_tp1_and_pp2(reference, tmp_path):
    full = reference[0]
    path = str(tmp_path / "ckpt")
    (tmp_path / "ckpt").mkdir()
    saved = [x for x in run_distributed(_save, 2, full, path) if x is not None]
    assert abs(saved[0] - reference[1]) < 1e-5
    for tp, pp in [(1, 1), (1, 2)]:
        losses = [x for x in run_distributed(_load, tp * pp, tp, pp, path) if x is not None]
        assert losses and all(abs(x - saved[0]) < 1e-6 for x in losses), (tp, pp, losses, saved)
