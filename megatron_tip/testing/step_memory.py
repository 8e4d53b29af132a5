"""Measure the memory of one training step, phase by phase, with the real trainer code.

What is measured (per rank, CPU, fp32): ``resident`` = bytes of every tensor storage alive when
the step begins (student and teacher weights, the DDP gradient buffer, Adam state, megatron's
global buffers), found by walking the garbage collector after one warm-up step; then, through
``PeakMemory``, the peak bytes of storages created during (1) the scoring pass + token selection,
(2) the gradient pass, (3) the optimizer step. A phase's total = resident + its peak. Rollouts
are synthetic (fixed prompt and response lengths), so rollout memory is not part of it.
``predict`` evaluates the planner's memory model for the same case.
"""
from __future__ import annotations

import gc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

REPO = Path(__file__).resolve().parents[2]
TOKENIZER = REPO / "examples" / "toy" / "models" / "tokenizer"
V_QWEN = 151_936


@dataclass(frozen=True)
class Case:
    """One calibration configuration (shapes scaled down, vocabulary at full size)."""

    name: str
    tp: int = 1
    pp: int = 1
    keep_ratio: float = 1.0
    vocab: int = V_QWEN
    student: dict = field(default_factory=lambda: dict(family="qwen3", hidden=64, layers=2, heads=4,
                                                       kv_heads=2, ffn=128, tie=False))
    teacher: dict = field(default_factory=lambda: dict(family="qwen3", hidden=96, layers=2, heads=4,
                                                       kv_heads=2, ffn=192, tie=False))
    rollouts: int = 4  # sequences in the step (one data-parallel rank)
    prompt_len: int = 16
    response_len: int = 112
    micro_batch: int = 2
    score_chunk_tokens: int = 128
    stats_chunk_size: Optional[int] = None
    fused_chunk_size: Optional[int] = None
    fused_output_layer: bool = True  # scoring.fused_output_layer (the trainer's default)
    # scoring.ops_impl. PeakMemory cannot see inside torch.compile kernels (compile refuses a
    # dispatch mode, so their bodies run as plain ops there): calibrate the eager path.
    ops_impl: str = "eager"

    @property
    def world(self) -> int:
        return self.tp * self.pp

    @property
    def seq_len(self) -> int:
        return self.prompt_len + self.response_len


def make_models(case: Case, root: Path) -> tuple[Path, Path]:
    """Random teacher and student HF dirs under ``root`` (and a one-line prompt file for ``build``)."""
    from megatron_tip.testing.tiny_models import make_tiny_hf_model, write_prompts

    write_prompts(root / "prompts.jsonl", [{"problem": "1+1", "answer": "2"}])  # rollouts are synthetic

    dirs = []
    for role, seed in (("teacher", 1), ("student", 2)):
        m = dict(getattr(case, role))
        dirs.append(make_tiny_hf_model(root / role, tokenizer_dir=TOKENIZER, family=m.pop("family"),
                                       hidden=m.pop("hidden"), layers=m.pop("layers"), heads=m.pop("heads"),
                                       kv_heads=m.pop("kv_heads"), ffn=m.pop("ffn"), tie=m.pop("tie"),
                                       vocab_size=case.vocab, seed=seed))
    return dirs[0], dirs[1]


def overrides(case: Case, root: Path) -> list[str]:
    policy = ["selection.policy=all"] if case.keep_ratio >= 1 else [
        "selection.policy=topk", f"selection.keep_ratio={case.keep_ratio}", "selection.scope=per_sequence"]
    return [f"student.path={root / 'student'}", f"teacher.path={root / 'teacher'}",
            f"data.prompts={root / 'prompts.jsonl'}", "data.prompt_format='{problem}'",
            f"data.max_prompt_len={case.prompt_len}",
            f"parallel.tensor_parallel={case.tp}", f"parallel.pipeline_parallel={case.pp}",
            f"scoring.vocab_size={case.vocab}", f"train.micro_batch_size={case.micro_batch}",
            f"train.prompts_per_step={case.rollouts}", "rollout.samples_per_prompt=1",
            f"rollout.max_new_tokens={case.response_len}",
            f"scoring.score_chunk_tokens={case.score_chunk_tokens}", "log.tensorboard=false",
            f"run.out_dir={root / 'run'}", "train.steps=2", "optim.lr=1e-4", *policy,
            f"scoring.fused_output_layer={str(case.fused_output_layer).lower()}",
            f"scoring.ops_impl={case.ops_impl}"] + (
            [f"scoring.stats_chunk_size={case.stats_chunk_size}"] if case.stats_chunk_size else []) + (
            [f"scoring.fused_chunk_size={case.fused_chunk_size}"] if case.fused_chunk_size else [])


def _packed(case: Case, pad_id: int):
    from megatron_tip.rollout.base import Rollout
    from megatron_tip.rollout.layout import pad_rollouts

    g = torch.Generator().manual_seed(0)
    rollouts = [Rollout(prompt_index=i, prompt_ids=torch.randint(4, case.vocab, (case.prompt_len,), generator=g).tolist(),
                        response_ids=torch.randint(4, case.vocab, (case.response_len,), generator=g).tolist())
                for i in range(case.rollouts)]
    return pad_rollouts(rollouts, pad_id=pad_id)


def _step(trainer, packed, step: int, mem=None) -> dict[str, int]:
    """The trainer's own scoring, selection, gradient pass and optimizer step on ``packed``."""
    peaks = {}
    scored = trainer.score(packed)
    sel, _ = trainer.select(scored, step)
    peaks["scoring"] = mem.mark() if mem else 0
    trainer.gradient_pass(scored, sel.mask if sel is not None else None)
    peaks["gradient"] = mem.mark() if mem else 0
    trainer.optimizer_step()
    peaks["optimizer"] = mem.mark() if mem else 0
    return peaks


def measure_rank(rank: int, world: int, case: Case, root: Path) -> dict:
    """Run on every rank of ``megatron_tip.launch.run_distributed(measure_rank, case.world, case, root)``."""
    from megatron_tip.build import build
    from megatron_tip.config import load_config
    from megatron_tip.distributed import init_parallel
    from megatron_tip.testing.memory import PeakMemory
    from megatron_tip.trainer import Trainer

    ctx = init_parallel(case.tp, pp=case.pp)
    cfg = load_config(None, overrides(case, root))
    parts = build(cfg, ctx)
    trainer = Trainer(cfg, ctx, parts)
    packed = _packed(case, parts.pad_id)
    _step(trainer, packed, 0)  # warm-up: Adam state and megatron's buffers exist after it
    gc.collect()
    with PeakMemory() as mem:
        peaks = _step(trainer, packed, 1, mem)
    return {"rank": rank, "tp_rank": ctx.tp_rank, "pp_rank": ctx.pp_rank, "resident": mem.resident, **peaks}


def predict(case: Case, root: Path):
    """The planner's StageMemory list for ``case`` (same shapes, CPU runtime as PeakMemory sees it:
    compiled kernels run as plain ops; no rollout phase)."""
    from megatron_tip.plan.inputs import TRACED_CPU_RUNTIME, Layout, PlanInputs, Settings, Workload
    from megatron_tip.plan.memory import plan_memory
    from megatron_tip.checkpoint import read_spec

    w = Workload(rollouts=case.rollouts, seq_len=case.seq_len, prompt_len=case.prompt_len,
                 response_len=case.response_len, micro_batch=case.micro_batch, keep_ratio=case.keep_ratio,
                 score_chunk_tokens=case.score_chunk_tokens, stats_chunk_size=case.stats_chunk_size,
                 shared_vocab=case.vocab, rollout_engine="none", fused_output_layer=case.fused_output_layer,
                 ops_impl=case.ops_impl, fused_chunk_size=case.fused_chunk_size)
    inp = PlanInputs(student=read_spec(str(root / "student")), teacher=read_spec(str(root / "teacher")),
                     student_dtype="float32", teacher_dtype="float32", layout=Layout(tp=case.tp, pp=case.pp, dp=1),
                     settings=Settings(), workload=w, runtime=TRACED_CPU_RUNTIME)
    return plan_memory(inp)


def compare(case: Case, root: Path, measured: list[dict]) -> list[dict]:
    """Per rank and phase: measured total, predicted total, relative error."""
    stages = predict(case, root)
    rows = []
    for m in measured:
        st = stages[m["pp_rank"]]
        for phase in ("scoring", "gradient", "optimizer"):
            meas = m["resident"] + m[phase]
            pred = st.total(phase)
            rows.append({"case": case.name, "rank": m["rank"], "pp_rank": m["pp_rank"], "phase": phase,
                         "measured": meas, "predicted": pred, "measured_transient": m[phase],
                         "predicted_transient": pred - sum(st.persistent.values()),
                         "resident": m["resident"], "predicted_resident": sum(st.persistent.values()),
                         "error": pred / meas - 1})
    return rows
