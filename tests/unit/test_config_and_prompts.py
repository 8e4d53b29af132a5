"""Bad config and prompt files fail at load time with one clear message; prompt order is deterministic."""
import re
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


@pytest.mark.parametrize("override,match", [
    ("teacher.recompute_granularity=full", "activation recomputation applies to the student only"),
    ("student.recompute_granularity=fast", "student.recompute_granularity='fast': must be one of none, selective, full"),
    ("student.recompute_num_layers=0", "student.recompute_num_layers=0: must be >= 1"),
    ("parallel.sequence_parallel=true", "sequence_parallel=true needs tensor_parallel >= 2"),
    ("student.transformer_impl=te", "student.transformer_impl='te'"),
    ("run.resume=maybe", "run.resume='maybe': must be one of false, true, auto"),
    ("train.max_skipped_fraction=1.5", "train.max_skipped_fraction=1.5: must be in [0, 1]"),
    ("rollout.top_p=0", "rollout.top_p=0.0: must be in (0, 1]"),
    ("train.micro_batch_size=0", "train.micro_batch_size=0: must be >= 1"),
    ("run.exit_interval=-1", "run.exit_interval=-1: must be >= 0"),
    ("scoring.fused_chunk_size=0", "scoring.fused_chunk_size=0: must be >= 1"),
    ("train.max_tokens_per_microbatch=-1", "train.max_tokens_per_microbatch=-1: must be >= 0"),
    # defaults: data.max_prompt_len 2048 + rollout.max_new_tokens 64
    ("train.max_tokens_per_microbatch=2111", "train.max_tokens_per_microbatch=2111 is smaller than the longest "
                                             "allowed sequence data.max_prompt_len + rollout.max_new_tokens = 2112"),
])
def test_new_fields_are_validated_at_load(override, match):
    with pytest.raises(ValueError, match=re.escape(match)):
        load_config(None, [override])


def test_memory_features_the_build_cannot_run_are_refused_before_loading():
    from types import SimpleNamespace

    import torch

    from megatron_tip.build import check_memory_features
    from megatron_tip.models.spec import ModelSpec

    spec = ModelSpec(family="llama", num_layers=4, hidden_size=32, num_attention_heads=2, num_query_groups=2,
                     ffn_hidden_size=64, vocab_size=100)
    cpu = SimpleNamespace(device=torch.device("cpu"), pp=2)
    cases = [(["parallel.tensor_parallel=2", "parallel.sequence_parallel=true"], "sequence_parallel=true is not supported"),
             (["optim.distributed_optimizer=true"], "distributed_optimizer=true needs CUDA"),
             (["student.recompute_granularity=full", "student.recompute_num_layers=3"], "exceeds the 2 layers"),
             (["student.recompute_granularity=full", "student.recompute_method=block", "student.recompute_num_layers=3"],
              "exceeds the 2 layers")]
    for overrides, match in cases:
        with pytest.raises(ValueError, match=match):
            check_memory_features(load_config(None, overrides), student=spec, ctx=cpu)
    check_memory_features(load_config(None, ["student.recompute_granularity=full", "student.recompute_num_layers=2"]),
                          student=spec, ctx=cpu)


def test_bad_files_are_named_with_the_problem(tmp_path):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("student: {path: x\n  oops")
    with pytest.raises(ValueError, match=re.escape(f"{bad_yaml}: line 2")):
        load_config(str(bad_yaml))
    listed = tmp_path / "list.yaml"
    listed.write_text("- student\n- teacher\n")
    with pytest.raises(ValueError, match="a config file is a mapping of sections"):
        load_config(str(listed))
    with pytest.raises(ValueError, match=re.escape("train.out_dir (moved to run.out_dir)")):
        load_config(None, ["train.out_dir=x"])
    latin = tmp_path / "latin1.jsonl"
    latin.write_bytes(b'{"problem": "1+1", "answer": "2"}\n{"problem": "caf\xe9", "answer": "3"}\n')
    with pytest.raises(ValueError, match=re.escape(f"{latin}:2: not UTF-8 text")):
        PromptDataset(str(latin), encode=lambda s: [1], max_prompt_len=10, seed=0)


def test_corrupt_weight_files_are_named(tmp_path):
    from megatron_tip.models.hf.weights import HFCheckpointReader

    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'model.safetensors'}: not a valid safetensors")):
        HFCheckpointReader(tmp_path)
