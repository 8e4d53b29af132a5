"""The native megatron rollout engine samples exactly what the model defines.

References: HF `generate` (greedy tokens) and HF log-softmax (log-probs of sampled tokens);
and the KV-cache path (PP=1) against the recompute path, at TP=1, TP=2 and PP=2.
"""
import pytest
import torch

from megatron_tip.launch import run_distributed
from tests.helpers.trainer_cases import make_pair, overrides

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("pair")
    return (root,) + make_pair(root)


def _generate(rank, world, tp, pp, root, teacher, student, path, extra=()):
    from megatron_tip.config import load_config
    from megatron_tip.distributed import init_parallel
    from megatron_tip.rollout.base import SamplingParams
    from megatron_tip.build import build

    ctx = init_parallel(tp, pp=pp)
    setup = build(load_config(None, overrides(root, teacher, student) + list(extra)), ctx)
    eng = setup.engine
    if path == "recompute":
        eng._generate_rows = eng._generate_rows_recompute
    prompts = [p.ids for p in setup.dataset.prompts[:3]]
    out = {}
    for temp in (0.0, 1.0):
        params = SamplingParams(n=2, temperature=temp, max_new_tokens=10, seed=11, stop_token_ids=(5,))
        out[temp] = [(r.prompt_index, r.prompt_ids, r.response_ids, r.logprobs, r.finished)
                     for r in eng.generate(prompts, params)]
    return out


def _hf_check(student, results):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(student, torch_dtype=torch.float32)
    for temp, rows in results.items():
        assert [r[0] for r in rows] == [0, 0, 1, 1, 2, 2]  # prompt-major
        for _, prompt, resp, lps, finished in rows:
            assert 1 <= len(resp) <= 10 and len(lps) == len(resp)
            assert finished == (resp[-1] == 5) and 5 not in resp[:-1]
            ids = torch.tensor([prompt + resp])
            with torch.no_grad():
                logp = torch.log_softmax(model(ids).logits[0].double(), -1)
            ref = logp[len(prompt) - 1: len(prompt) - 1 + len(resp)].gather(1, torch.tensor(resp)[:, None])[:, 0]
            torch.testing.assert_close(torch.tensor(lps, dtype=torch.float64), ref, atol=2e-4, rtol=1e-4)
            if temp == 0.0:
                hf = model.generate(torch.tensor([prompt]), max_new_tokens=len(resp), do_sample=False,
                                    eos_token_id=5, pad_token_id=0)
                assert hf[0, len(prompt):].tolist() == resp


def test_kv_cache_engine_matches_hf(pair):
    root, teacher, student = pair
    results = run_distributed(_generate, 1, 1, 1, root, teacher, student, "kv")[0]
    _hf_check(student, results)


@pytest.mark.parametrize("tp,pp,path", [(1, 1, "recompute"), (2, 1, "kv"), (1, 2, "recompute")])
def test_layouts_and_paths_agree(pair, tp, pp, path):
    root, teacher, student = pair
    ref = run_distributed(_generate, 1, 1, 1, root, teacher, student, "kv")[0]
    for got in run_distributed(_generate, tp * pp, tp, pp, root, teacher, student, path):
        for temp in (0.0, 1.0):
            assert [r[2] for r in got[temp]] == [r[2] for r in ref[temp]], (tp, pp, path, temp)
            if got[temp][0][3] is not None:  # log-probs live on the last stage
                for a, b in zip(got[temp], ref[temp]):
                    torch.testing.assert_close(torch.tensor(a[3]), torch.tensor(b[3]), atol=1e-4, rtol=1e-4)


def test_tokens_do_not_depend_on_the_rollout_batch(pair):
    """rollout.micro_batch_size only splits the decode batch: per-row streams derive from the seed."""
    root, teacher, student = pair
    whole = run_distributed(_generate, 1, 1, 1, root, teacher, student, "kv")[0]  # default: all 6 rows at once
    split = run_distributed(_generate, 1, 1, 1, root, teacher, student, "kv", ["rollout.micro_batch_size=4"])[0]
    for temp in (0.0, 1.0):
        assert [r[2] for r in split[temp]] == [r[2] for r in whole[temp]], temp
        for a, b in zip(split[temp], whole[temp]):
            torch.testing.assert_close(torch.tensor(a[3]), torch.tensor(b[3]), atol=1e-5, rtol=1e-5)
