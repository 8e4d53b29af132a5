"""Run-time errors name the problem (vocab mismatch, vLLM layout) and NaN logits skip a step, not the run."""
import pytest
import torch
from megatron_tip.config import load_config
from megatron_tip.launch import RankFailure, run_distributed
from megatron_tip.testing.tiny_models import make_tiny_hf_model
from tests.helpers.trainer_cases import TOKENIZER, make_pair, overrides


pytestmark = pytest.mark.timeout(300)


def _setup_only(rank, world, argv):
    from megatron_tip.distributed import init_parallel
    from megatron_tip.build import build

    build(load_config(None, argv), init_parallel(1))


def test_teacher_vocab_mismatch_is_rejected(tmp_path):
    teacher, student = make_pair(tmp_path)
    small = make_tiny_hf_model(tmp_path / "small_teacher", tokenizer_dir=TOKENIZER, vocab_size=200)
    with pytest.raises(RankFailure, match="teacher vocab_size=200 is smaller than the shared vocabulary"):
        run_distributed(_setup_only, 1, overrides(tmp_path, small, student))


def _nan_step(rank, world, argv):
    from megatron_tip.distributed import init_parallel
    from megatron_tip.build import build
    from megatron_tip.trainer import Trainer

    cfg = load_config(None, argv)
    ctx = init_parallel(1)
    setup = build(cfg, ctx)
    trainer = Trainer(cfg, ctx, setup)
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
    with pytest.raises(RankFailure, match="rollout.engine=vllm needs parallel.pipeline_parallel=1"):
        run_distributed(_vllm_layout, 2, 1, 2)


@pytest.mark.parametrize("tp", [1, 2])
def test_vllm_engine_joins_the_world_as_external_launcher(tp):
    # Every rank builds its own engine; vLLM's TP group must be the megatron TP group.
    for kwargs in run_distributed(_vllm_layout, 2, tp, 1):
        assert kwargs == {"tensor_parallel_size": tp, "distributed_executor_backend": "external_launcher"}
