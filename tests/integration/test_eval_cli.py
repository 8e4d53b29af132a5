"""The end-to-end `python -m megatron_tip.eval` CLI (subprocess) on a tiny random HF model and a megatron checkpoint."""
import json
import os
import subprocess
import sys
import pytest
from tests.helpers.paths import REPO, EVAL_DATA as DATA


@pytest.mark.timeout(300)
def test_cli_end_to_end_on_tiny_random_model(tokenizer, tmp_path):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=2048,
                      pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id)
    model_dir = tmp_path / "tiny"
    LlamaForCausalLM(cfg).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    out = tmp_path / "res.jsonl"
    cmd = [sys.executable, "-m", "megatron_tip.eval", "--model", str(model_dir), "--data",
           str(DATA / "math500.jsonl"), "--limit", "2", "--samples", "2", "--temperature", "1.0",
           "--max-new-tokens", "8", "--batch-size", "4", "--out", str(out), "--threads", "1", "--seed", "3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 2
    for r in rows:
        assert len(r["completions"]) == 2 and len(r["correct"]) == 2
        assert r["correct"] == [False, False] and r["mean"] == 0.0  # random weights answer wrong
        assert set(r["pass@k"]) == {"1", "2"}
    summary = json.loads((tmp_path / "res.summary.json").read_text())
    assert summary["num_problems"] == 2 and summary["samples"] == 2 and summary["mean@2"] == 0.0
    assert summary["mean@2_se"] == 0.0 and summary["mean@2_std_samples"] == 0.0
    assert summary["sampling"] == {"temperature": 1.0, "top_p": 1.0, "top_k": "off", "repetition_penalty": 1.0,
                                   "presence_penalty": 0.0, "frequency_penalty": 0.0, "min_new_tokens": 0,
                                   "max_new_tokens": 8, "stop_token_ids": [tokenizer.eos_token_id],
                                   "greedy": False, "seed": 3}
    assert "mean@2" in res.stdout and "pass@2" in res.stdout


@pytest.mark.slow  # ~35 s (converts, then evaluates twice); test_cli_end_to_end_on_tiny_random_model is the CI variant
def test_cli_on_megatron_checkpoint_equals_hf(tmp_path):
    """A megatron checkpoint is exported to HF and evaluated; greedy results equal the HF run's."""
    from megatron_tip.convert.run import hf_to_megatron

    toy = REPO / "examples" / "toy"
    mdir = tmp_path / "student_tp2"
    hf_to_megatron(toy / "models" / "student", mdir, tp=2)  # a TP=2 layout, merged again on export
    outs = {}
    for name, model in (("hf", toy / "models" / "student"), ("megatron", mdir)):
        out = tmp_path / f"{name}.jsonl"
        cmd = [sys.executable, "-m", "megatron_tip.eval", "--model", str(model), "--data",
               str(toy / "data" / "heldout.jsonl"), "--limit", "6", "--samples", "1", "--temperature", "0",
               "--max-new-tokens", "48", "--out", str(out), "--threads", "1", "--no-progress"]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
        res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
        outs[name] = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["completions"] for r in outs["hf"]] == [r["completions"] for r in outs["megatron"]]
    assert any(any(r["correct"]) for r in outs["hf"])  # the toy student solves some greedily
