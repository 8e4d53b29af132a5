"""Bad config and prompt files fail at load time with one clear message; prompt order is deterministic."""
import pytest
from megatron_tip.config import load_config
from megatron_tip.data import PromptDataset
from megatron_tip.testing.tiny_models import write_prompts


pytestmark = pytest.mark.timeout(300)


def test_unknown_config_key_is_named():
    with pytest.raises(ValueError, match="unknown config key.*train.stepz"):
        load_config(None, ["train.stepz=3"])
    with pytest.raises(ValueError, match="selection.*keep_ratio"):
        load_config(None, ["selection.keep_ratio=1.5"])
    with pytest.raises(ValueError, match="'train.steps': expected int"):
        load_config(None, ["train.steps=abc"])
    cfg = load_config(None, ["train.steps=7", "selection.policy=all", "rollout.temperature=0.7"])
    assert (cfg.train.steps, cfg.selection.policy, cfg.rollout.temperature) == (7, "all", 0.7)


def test_yaml_config_and_missing_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  steps: 3\nselection:\n  policy: topk\n  score: q3\n")
    cfg = load_config(str(p), ["train.steps=5"])
    assert cfg.train.steps == 5 and cfg.selection.score == "q3"
    with pytest.raises(FileNotFoundError, match="config file not found"):
        load_config(str(tmp_path / "nope.yaml"))


def test_prompt_file_errors(tmp_path):
    enc = lambda s: list(range(len(s)))  # noqa: E731
    with pytest.raises(FileNotFoundError, match="prompt file not found"):
        PromptDataset(str(tmp_path / "missing.jsonl"), encode=enc, max_prompt_len=10, seed=0)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="is empty"):
        PromptDataset(str(tmp_path / "empty.jsonl"), encode=enc, max_prompt_len=10, seed=0)
    write_prompts(tmp_path / "long.jsonl", [{"problem": "x" * 50, "answer": "1"}])
    with pytest.raises(ValueError, match="long.jsonl:1: prompt has 50 tokens, more than data.max_prompt_len=10"):
        PromptDataset(str(tmp_path / "long.jsonl"), encode=enc, max_prompt_len=10, seed=0)
    write_prompts(tmp_path / "nofield.jsonl", [{"question": "1+1"}])
    with pytest.raises(ValueError, match="needs 'problem' and 'answer'"):
        PromptDataset(str(tmp_path / "nofield.jsonl"), encode=enc, max_prompt_len=10, seed=0)


def test_prompt_order_is_deterministic_and_covers_epochs(tmp_path):
    write_prompts(tmp_path / "p.jsonl", [{"problem": str(i), "answer": str(i)} for i in range(5)])
    ds = PromptDataset(str(tmp_path / "p.jsonl"), encode=lambda s: [1], max_prompt_len=4, seed=3)
    first = [p.problem for s in range(5) for p in ds.batch(s, size=2)]  # 10 prompts = 2 epochs
    assert sorted(first[:5]) == sorted(first[5:]) == [str(i) for i in range(5)]
    assert first == [p.problem for s in range(5) for p in ds.batch(s, size=2)]
