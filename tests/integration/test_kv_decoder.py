"""rollout.kv_decoder gives bitwise megatron-core's own static-KV-cache logits (so the same tokens).

Reference: ``GPTModel(..., inference_context=StaticInferenceContext)``, megatron-core's inference
path, on the same weights: prefill of a prompt block, then one position at a time, at TP=1 and
TP=2 (gloo), for each family the converter supports (Qwen3 QK-norm, Qwen2 QKV bias, Llama-3 RoPE
scaling, GQA, tied and untied output layers) and bf16; the same after rows leave the batch
(``KVDecoder.keep``). Then the engine: KVDecoder on (finished rows dropped) and off give the same
tokens and log-probs.
"""
import pytest
import torch

from megatron_tip.launch import run_distributed
from megatron_tip.models.spec import ModelSpec

pytestmark = pytest.mark.timeout(300)

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
SPECS = {
    "qwen3_tied": ModelSpec(family="qwen3", num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                            ffn_hidden_size=96, vocab_size=101, qk_layernorm=True, tie_word_embeddings=True),
    "qwen2_bias": ModelSpec(family="qwen2", num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=4,
                            ffn_hidden_size=96, vocab_size=101, add_qkv_bias=True),
    "llama3_gqa": ModelSpec(family="llama", num_layers=3, hidden_size=64, num_attention_heads=8, num_query_groups=2,
                            ffn_hidden_size=128, vocab_size=101, rope_scaling=LLAMA3_ROPE, rotary_base=500000.0),
}


def _compare(rank, world, tp, name, dtype):
    from megatron_tip.distributed import init_parallel
    from megatron_tip.models import build_gpt_model
    from megatron_tip.rollout.kv_decoder import unsupported
    from megatron_tip.testing.decode import decode_logits

    ctx = init_parallel(tp, seed=3)
    model = build_gpt_model(SPECS[name], tp=tp, params_dtype=dtype).eval()
    assert unsupported(model) is None, unsupported(model)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, SPECS[name].vocab_size, (5, 14), generator=g)  # prefill 6, then 8 decode steps
    ref = decode_logits(model, ids, prompt=6, lean=False)
    got = decode_logits(model, ids, prompt=6, lean=True, tp_group=ctx.tp_group)
    return [torch.equal(a, b) for a, b in zip(got, ref)], max((a - b).abs().max().item() for a, b in zip(got, ref))


@pytest.mark.parametrize("name", sorted(SPECS))
def test_logits_bitwise_equal_to_megatron_inference_tp1(name):
    same, worst = run_distributed(_compare, 1, 1, name, torch.float32)[0]
    assert all(same), (name, same, worst)


def test_logits_bitwise_equal_bf16():
    same, worst = run_distributed(_compare, 1, 1, "qwen3_tied", torch.bfloat16)[0]
    assert all(same), (same, worst)


@pytest.mark.parametrize("name", ["qwen3_tied", "llama3_gqa"])
def test_logits_bitwise_equal_to_megatron_inference_tp2(name):
    for same, worst in run_distributed(_compare, 2, 2, name, torch.float32):
        assert all(same), (name, same, worst)


def _compare_shrunk(rank, world, tp, name):
    from megatron_tip.distributed import init_parallel
    from megatron_tip.models import build_gpt_model
    from megatron_tip.rollout.kv_decoder import MIN_ROWS
    from megatron_tip.testing.decode import decode_logits

    ctx = init_parallel(tp, seed=3)
    model = build_gpt_model(SPECS[name], tp=tp).eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, SPECS[name].vocab_size, (13, 14), generator=g)  # prefill 6, then 8 decode steps
    # after step 2 keep 10 of the 13 rows, after step 5 MIN_ROWS of those
    first = [0, 2, 3, 5, 6, 7, 9, 10, 11, 12]
    second = [1, 2, 3, 4, 5, 6, 8, 9][:MIN_ROWS]
    ref = decode_logits(model, ids, prompt=6, lean=False)
    got = decode_logits(model, ids, prompt=6, lean=True, tp_group=ctx.tp_group, keep={2: first, 5: second})
    rows = [list(range(13))] * 3 + [first] * 3 + [[first[j] for j in second]] * 3
    return [torch.equal(a, r[idx]) for a, r, idx in zip(got, ref, rows)]


@pytest.mark.parametrize("tp,name", [(1, "qwen3_tied"), (1, "qwen2_bias"), (2, "llama3_gqa")])
def test_dropping_rows_keeps_the_other_rows_logits_bitwise(tp, name):
    """KVDecoder.keep (the engine drops finished rows): the kept rows' logits stay bitwise those of
    megatron's full batch, down to MIN_ROWS rows."""
    for same in run_distributed(_compare_shrunk, tp, tp, name):
        assert len(same) == 9 and all(same), same


def _unsupported_pp2(rank, world):
    from megatron_tip.distributed import init_parallel
    from megatron_tip.models import build_gpt_model
    from megatron_tip.rollout.kv_decoder import unsupported

    ctx = init_parallel(1, pp=2)
    return unsupported(build_gpt_model(SPECS["qwen3_tied"], pp=2, pp_rank=ctx.pp_rank))


def test_pipeline_stages_fall_back():
    assert run_distributed(_unsupported_pp2, 2) == ["pipeline parallelism"] * 2


def _engine_rollouts(rank, world, root, teacher, student, lean):
    from megatron_tip.build import build
    from megatron_tip.config import load_config
    from megatron_tip.distributed import init_parallel
    from megatron_tip.rollout.base import SamplingParams
    from tests.helpers.trainer_cases import overrides

    from megatron_tip.rollout.kv_decoder import KVDecoder

    setup = build(load_config(None, overrides(root, teacher, student)), init_parallel(1))
    setup.engine.lean_decode = lean
    shrunk = []
    keep = KVDecoder.keep
    KVDecoder.keep = lambda self, rows: (shrunk.append(rows.numel()), keep(self, rows))[1]
    try:
        prompts = [p.ids for p in setup.dataset.prompts[:4]]
        params = SamplingParams(n=4, temperature=1.0, max_new_tokens=12, seed=5, stop_token_ids=(5,))
        out = [(r.response_ids, r.logprobs, r.finished) for r in setup.engine.generate(prompts, params)]
    finally:
        KVDecoder.keep = keep
    return out, shrunk


def test_engine_tokens_and_logprobs_identical_with_and_without(tmp_path):
    from tests.helpers.trainer_cases import make_pair

    teacher, student = make_pair(tmp_path)
    on, shrunk = run_distributed(_engine_rollouts, 1, tmp_path, teacher, student, True)[0]
    off, none = run_distributed(_engine_rollouts, 1, tmp_path, teacher, student, False)[0]
    assert on == off
    assert shrunk and not none, (shrunk, none)  # finished rows left the lean batch (megatron's path keeps them)
    assert len({len(r[0]) for r in on}) > 1  # rows of several lengths: early stops exercised
