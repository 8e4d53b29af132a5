"""Bad input gives a clear message (and nothing is lost): config, prompts, vocab, NaN logits."""
import pytest
import torch

from megatron_tip.config import load_config
from megatron_tip.data import PromptDataset
from megatron_tip.testing import RankFailure, run_distributed
from megatron_tip.testing.tiny_models import make_tiny_hf_model, write_prompts
from trainer_cases import TOKENIZER, make_pair, overrides

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


def _setup_only(rank, world, argv):
    from megatron_tip.distributed import init_parallel
    from megatron_tip.run_setup import TrainingSetup

    TrainingSetup(load_config(None, argv), init_parallel(1))


def test_teacher_vocab_mismatch_is_rejected(tmp_path):
    teacher, student = make_pair(tmp_path)
    small = make_tiny_hf_model(tmp_path / "small_teacher", tokenizer_dir=TOKENIZER, vocab_size=200)
    with pytest.raises(RankFailure, match="teacher vocab_size=200 is smaller than the shared vocabulary"):
        run_distributed(_setup_only, 1, overrides(tmp_path, small, student))


def _nan_step(rank, world, argv):
    from megatron_tip.distributed import init_parallel
    from megatron_tip.run_setup import TrainingSetup
    from megatron_tip.trainer import Trainer

    cfg = load_config(None, argv)
    setup = TrainingSetup(cfg, init_parallel(1))
    trainer = Trainer(cfg, setup.ctx, setup)
    w = setup.teacher.decoder.final_layernorm.weight
    saved = w.detach().clone()
    with torch.no_grad():
        w[0] = float("nan")
    bad = trainer.train_step(0)
    with torch.no_grad():
        w.copy_(saved)
    good = trainer.train_step(1)
    return bad, good


def test_nan_logits_skip_the_step_and_the_run_continues(tmp_path):
    teacher, student = make_pair(tmp_path)
    bad, good = run_distributed(_nan_step, 1, overrides(tmp_path, teacher, student))[0]
    assert bad["skipped"] == 1.0 and bad["skipped_steps"] == 1.0
    assert "skipped" not in good and good["skipped_steps"] == 1.0 and good["loss"] > 0


def _vllm_layout(rank, world, tp, pp):
    from megatron_tip.distributed import init_parallel
    from megatron_tip.rollout.colocated import external_launcher_kwargs

    return external_launcher_kwargs(init_parallel(tp, pp=pp))


def test_vllm_engine_refuses_pipeline_parallel_runs():
    with pytest.raises(RankFailure, match="rollout.engine=vllm needs pipeline_parallel=1"):
        run_distributed(_vllm_layout, 2, 1, 2)


@pytest.mark.parametrize("tp", [1, 2])
def test_vllm_engine_joins_the_world_as_external_launcher(tp):
    # Every rank builds its own engine; vLLM's TP group must be the megatron TP group.
    for kwargs in run_distributed(_vllm_layout, 2, tp, 1):
        assert kwargs == {"tensor_parallel_size": tp, "distributed_executor_backend": "external_launcher"}
