"""Rollout engines smaller than the student's TP (gloo, 2 ranks, a fake engine, no vLLM): each
engine of a TP group samples its own contiguous share of the prompts with the seeds the whole list
gives them, and every TP rank gets all rollouts in prompt order."""
import pytest

from megatron_tip.launch import run_distributed

pytestmark = pytest.mark.timeout(120)


class _Fake:
    """Records what it was asked; a rollout's response names the prompt's seed index and the rank."""

    def __init__(self, rank, **kwargs):
        self.rank, self.kwargs, self.calls = rank, kwargs, []

    def generate(self, prompts, params, *, first_index=0):
        from megatron_tip.rollout import Rollout

        self.calls.append((len(prompts), first_index))
        return [Rollout(prompt_index=i, prompt_ids=p, response_ids=[first_index + i, self.rank])
                for i, p in enumerate(prompts) for _ in range(params.n)]


def _run(rank, world, engine_tp, n_prompts):
    from megatron_tip.distributed import init_parallel
    from megatron_tip.rollout import SamplingParams
    from megatron_tip.rollout.colocated import TPColocatedEngine

    ctx = init_parallel(2)
    eng = TPColocatedEngine(lambda **kw: _Fake(ctx.rank, **kw), ctx=ctx, engine_tp=engine_tp)
    prompts = [[100 + i] for i in range(n_prompts)]
    out = eng.generate(prompts, SamplingParams(n=2))
    return dict(kwargs=eng.engine.kwargs, calls=eng.engine.calls,
                out=[(r.prompt_index, r.prompt_ids, r.response_ids) for r in out])


@pytest.mark.parametrize("engine_tp,n_prompts", [(1, 5), (1, 1), (2, 5)])
def test_prompts_split_per_engine_and_gathered_in_order(engine_tp, n_prompts):
    results = run_distributed(_run, 2, engine_tp, n_prompts)
    first = (n_prompts + 1) // 2  # rank 0's engine takes the larger first share
    for rank, r in enumerate(results):
        assert r["kwargs"] == {"tensor_parallel_size": engine_tp, "distributed_executor_backend": "external_launcher"}
        if engine_tp == 1:  # two engines: rank 0 samples prompts [0, first), rank 1 the rest
            assert r["calls"] == [(first, 0)] if rank == 0 else [(n_prompts - first, first)]
        else:  # one engine over both ranks: both ranks sample everything, rank 0's copy is kept
            assert r["calls"] == [(n_prompts, 0)]
        assert r["out"] == results[0]["out"]  # every TP rank trains on the same rollouts
    want = [(i, [100 + i], [i, 0 if engine_tp == 2 or i < first else 1]) for i in range(n_prompts) for _ in range(2)]
    assert results[0]["out"] == want
