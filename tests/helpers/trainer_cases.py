"""Shared fixtures for trainer tests: a tiny teacher/student pair and a run config."""
from __future__ import annotations

from pathlib import Path

from megatron_tip.testing.tiny_models import make_tiny_hf_model

from tests.helpers.paths import REPO
TOKENIZER = REPO / "examples" / "toy" / "models" / "tokenizer"
PROMPTS = REPO / "examples" / "toy" / "data" / "train.jsonl"
TEMPLATE = "{problem}="


def make_student(root: Path, *, tie: bool = True) -> Path:
    """The pair's random student (smaller than the teacher); tied output layer unless told."""
    return make_tiny_hf_model(root / ("student" if tie else "student_untied"), tokenizer_dir=TOKENIZER,
                              family="llama", hidden=32, layers=2, heads=2, kv_heads=2, ffn=64, seed=2, tie=tie,
                              prompt_template=TEMPLATE)


def make_pair(root: Path) -> tuple[Path, Path]:
    """Random teacher (untied, 2 layers) and student (tied, smaller) sharing the toy tokenizer."""
    t = make_tiny_hf_model(root / "teacher", tokenizer_dir=TOKENIZER, family="qwen3", hidden=64,
                           layers=2, heads=4, kv_heads=2, ffn=128, seed=1, prompt_template=TEMPLATE)
    return t, make_student(root)


def make_teacher_kv4(root: Path, *, tie: bool = False) -> Path:
    """A teacher like the pair's (qwen3, 64 hidden, 2 layers) with 4 kv heads, so its TP can be 4;
    ``tie``: its output layer is the word embedding."""
    return make_tiny_hf_model(root / ("teacher_kv4_tied" if tie else "teacher_kv4"), tokenizer_dir=TOKENIZER,
                              family="qwen3", hidden=64, layers=2, heads=4, kv_heads=4, ffn=128, seed=6 if tie else 5,
                              tie=tie, prompt_template=TEMPLATE)


def overrides(root: Path, teacher: Path, student: Path, **extra) -> list[str]:
    base = {
        "student.path": student, "teacher.path": teacher, "data.prompts": PROMPTS,
        "data.max_prompt_len": 64, "rollout.samples_per_prompt": 2, "rollout.max_new_tokens": 8,
        "optim.lr": 1e-3, "train.steps": 2, "train.prompts_per_step": 4,
        "train.micro_batch_size": 4, "run.out_dir": root / "run", "log.tensorboard": False,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def run_train_main(rank: int, world: int, argv: list[str]):
    """One in-process CLI run (a rank of ``run_distributed``); returns ("ok", summary) or ("exit", code)."""
    from megatron_tip.train import main

    try:
        return "ok", main(argv)
    except SystemExit as e:
        return "exit", e.code


def poison_teacher(src: Path, dst: Path) -> Path:
    """A copy of HF teacher ``src`` at ``dst`` whose finite weights overflow the logits: every step's
    statistics are non-finite (the step is skipped)."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    weights = load_file(str(dst / "model.safetensors"))
    weights["model.norm.weight"] = torch.full_like(weights["model.norm.weight"], 3e38)
    save_file(weights, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def trainer_with_rollouts(root: Path, teacher: Path, student: Path, *, tp: int = 1, **extra):
    """Inside a rank: the toy pair's Trainer at TP=``tp`` (PP=1) and its first step's padded rollouts.

    Returns (cfg, parts, trainer, padded batch); ``extra`` are config overrides (dotted keys).
    """
    from megatron_tip.build import build
    from megatron_tip.config import load_config
    from megatron_tip.distributed import init_parallel
    from megatron_tip.rollout.layout import pad_rollouts
    from megatron_tip.trainer import Trainer

    cfg = load_config(None, overrides(root, teacher, student, **extra))
    ctx = init_parallel(tp, pp=1)
    parts = build(cfg, ctx)
    trainer = Trainer(cfg, ctx, parts)
    _, rollouts = trainer.rollout(0)
    return cfg, parts, trainer, pad_rollouts(rollouts, pad_id=parts.pad_id, device=ctx.device)
