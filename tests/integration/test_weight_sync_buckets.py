"""The weight sync to a rollout engine of another layout (gloo, TP=2 student, no vLLM).

``rollout.weight_sync.hf_weight_stream`` gathers the student's TP shards bucket by bucket: the
stream must equal the canonical full state dict converted to HF (what a TP=1 engine loads), use
one all-gather per bucket, and never keep more than one bucket of gathered tensors alive for a
consumer that drops each tensor once loaded, as vLLM's reload does.
"""
import weakref

import pytest
import torch

from megatron_tip.launch import run_distributed
from tests.helpers.megatron_cases import SPEC, build_layout, reference_weights

pytestmark = pytest.mark.timeout(300)
BUCKET = 160 * 1024  # bytes: a layer's tensors (~130 KB) share a bucket, the model (~720 KB) needs several


def _weights(rank, world):
    return reference_weights()


class _Meter:
    """Bytes of gathered storage still alive each time the consumer receives a tensor."""

    def __init__(self, model) -> None:
        self.own = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.refs: dict[int, tuple[weakref.ref, int]] = {}
        self.peak = 0

    def see(self, t: torch.Tensor) -> None:
        base = t if t._base is None else t._base
        ptr = base.untyped_storage().data_ptr()
        if ptr not in self.own:
            self.refs[ptr] = (weakref.ref(base), base.untyped_storage().nbytes())
        self.peak = max(self.peak, sum(n for r, n in self.refs.values() if r() is not None))


def _stream(rank, world, full, hold):
    import torch.distributed as dist

    from megatron_tip.distributed import init_parallel
    from megatron_tip.rollout.weight_sync import hf_weight_stream

    ctx = init_parallel(2)
    model = build_layout(ctx, full)
    calls = []
    real = dist.all_gather
    dist.all_gather = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        meter, got, held = _Meter(model), [], []
        for name, t in hf_weight_stream(model, spec=SPEC, tp_group=ctx.tp_group, bucket_bytes=BUCKET):
            meter.see(t)
            got.append((name, t.clone()))
            if hold:  # a consumer that keeps everything: the meter must see the whole model
                held.append(t)
            del t
    finally:
        dist.all_gather = real
    split = sum(1 for p in model.parameters() if getattr(p, "tensor_model_parallel", False))
    return dict(got=got, peak=meter.peak, all_gathers=len(calls), split_params=split)


@pytest.fixture(scope="module")
def full():
    return run_distributed(_weights, 1)[0]


def test_bucketed_stream_equals_the_full_state_dict_and_bounds_memory(full):
    from megatron_tip.models.hf.mapping import canonical_to_hf

    want = [(n, t.clone()) for n, t in canonical_to_hf(full, SPEC)]
    largest = max(t.numel() * t.element_size() for t in full.values())
    total = sum(t.numel() * t.element_size() for n, t in full.items() if "layernorm" not in n and "norm." not in n)
    results = run_distributed(_stream, 2, full, False)
    print(f"\nbucket {BUCKET} B, largest tensor {largest} B, model {total} B: peak alive {results[0]['peak']} B, "
          f"{results[0]['all_gathers']} all-gathers for {results[0]['split_params']} TP-split tensors")
    for r in results:
        names = [n for n, _ in r["got"]]
        assert sorted(names) == sorted(n for n, _ in want)  # every tensor once (in parameter order)
        got = dict(r["got"])
        for name, ref in want:
            torch.testing.assert_close(got[name], ref, atol=0, rtol=0, msg=name)
        # one collective per bucket, not per tensor
        assert 1 < r["all_gathers"] < r["split_params"]
        # one bucket alive at a time (a tensor larger than the bucket comes alone)
        assert 0 < r["peak"] <= max(BUCKET, largest), (r["peak"], BUCKET, largest)
    # control: the meter is not blind, a consumer keeping every tensor holds the gathered model
    held = run_distributed(_stream, 2, full, True)[0]
    assert held["peak"] >= total > max(BUCKET, largest)
