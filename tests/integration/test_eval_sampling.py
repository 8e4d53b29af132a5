"""Evaluation samples exactly as configured: a checkpoint's generation_config.json changes nothing.

The same random tiny Llama is saved twice; the second copy's generation_config.json carries what
Qwen2.5-Instruct ships (repetition_penalty > 1, top_k, its own temperature, extra end ids).
HF generate as the evaluator calls it must give identical tokens from both; HF generate called the
old way (overriding only T/top_p/top_k) must not, or this test would prove nothing.
"""
import json
import shutil
from collections import Counter

import torch

from megatron_tip.eval.runner import make_hf_generate_fn
from megatron_tip.rollout.base import FIXED_SAMPLING
from megatron_tip.testing.tiny_models import make_tiny_hf_model

PROMPTS = ["Q: 12+34\nA: ", "Q: 5+678\nA: ", "Q: 99+1\nA: "]
NEW = 16


def _models(tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    tokenizer.save_pretrained(tmp_path / "tok")
    plain = make_tiny_hf_model(tmp_path / "plain", tokenizer_dir=tmp_path / "tok", layers=1, seed=3)
    loaded = AutoModelForCausalLM.from_pretrained(plain)
    # tokens the plain model emits most often: as extra "end" ids they would cut generation short
    enc = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    torch.manual_seed(0)
    ids = loaded.generate(**enc, do_sample=True, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=NEW,
                          pad_token_id=tokenizer.pad_token_id)[:, enc["input_ids"].shape[1]:]
    frequent = [t for t, _ in Counter(ids.reshape(-1).tolist()).most_common(2)]
    tweaked = tmp_path / "tweaked"
    shutil.copytree(plain, tweaked)
    cfg = json.loads((tweaked / "generation_config.json").read_text())
    cfg.update(repetition_penalty=1.1, top_k=3, temperature=0.6, top_p=0.8, do_sample=True,
               eos_token_id=[tokenizer.eos_token_id, *frequent], transformers_version="4.57.0")
    (tweaked / "generation_config.json").write_text(json.dumps(cfg))
    return {name: AutoModelForCausalLM.from_pretrained(d) for name, d in (("plain", plain), ("tweaked", tweaked))}


def test_generation_config_json_is_ignored(tokenizer, tmp_path):
    models = _models(tokenizer, tmp_path)
    assert models["tweaked"].generation_config.repetition_penalty == 1.1  # the file was read
    for temperature in (1.0, 0.0):
        outs = {}
        for name, model in models.items():
            gen = make_hf_generate_fn(model, tokenizer, temperature=temperature, max_new_tokens=NEW, batch_size=2,
                                      seed=5, progress=False)
            outs[name] = gen(PROMPTS, 2)
            assert gen.settings == {"temperature": temperature, "top_p": 1.0, **FIXED_SAMPLING,
                                    "max_new_tokens": NEW, "stop_token_ids": [tokenizer.eos_token_id],
                                    "greedy": temperature == 0, "seed": 5}
        assert outs["plain"] == outs["tweaked"], temperature
        assert any(len(c) > 0 for cs in outs["plain"] for c in cs)

    # the old call (T/top_p/top_k only) inherits the penalty and the end ids: different tokens
    enc = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    old = {}
    for name, model in models.items():
        torch.manual_seed(5)
        old[name] = model.generate(**enc, do_sample=True, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=NEW,
                                   pad_token_id=tokenizer.pad_token_id).tolist()
    assert old["plain"] != old["tweaked"]
