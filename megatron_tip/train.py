"""Entry point: python -m megatron_tip.train --config CONFIG.yaml [key.sub=value ...]

Works as a single process (CPU default), under torchrun, and under srun (see slurm/).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch.distributed as dist

from megatron_tip.build import build
from megatron_tip.checkpoint.training import (remove_incomplete_checkpoints, resume_training,
                                              save_training_checkpoint)
from megatron_tip.checkpoint import tokenizer_dir
from megatron_tip.config import load_config
from megatron_tip.distributed import destroy_parallel, init_parallel
from megatron_tip.metrics_log import MetricsLogger
from megatron_tip.trainer import Trainer


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="YAML run config (examples/configs/*.yaml)")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. selection.keep_ratio=0.2")
    args = ap.parse_args(argv)
    cfg = load_config(args.config, args.overrides)

    ctx = init_parallel(cfg.parallel.tensor_parallel, pp=cfg.parallel.pipeline_parallel, seed=cfg.train.seed)
    out = cfg.run.out_dir
    try:
        parts = build(cfg, ctx)
        checkpoint = dict(model=parts.student.module, optimizer=parts.optimizer, scheduler=parts.scheduler,
                          spec=parts.student_spec, ctx=ctx)
        start = 0
        if cfg.run.resume:
            start = resume_training(out, **checkpoint)
        elif ctx.rank == 0:
            remove_incomplete_checkpoints(out)
        if ctx.rank == 0:
            Path(out).mkdir(parents=True, exist_ok=True)
            (Path(out) / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
        trainer = Trainer(cfg, ctx, parts)
        logger = MetricsLogger(out, enabled=ctx.rank == 0, total_steps=cfg.train.steps,
                               start_step=start, tensorboard=cfg.log.tensorboard)
        evals: dict = {}
        if parts.eval_dataset is not None and start == 0 and cfg.eval.before:
            evals["before"] = _evaluate(trainer, parts.eval_dataset, cfg.eval.limit)
            _report(ctx, "held-out before", evals["before"])
        last: dict = {}
        for step in range(start, cfg.train.steps):
            last = trainer.train_step(step)
            logger.log(last)
            final = step == cfg.train.steps - 1
            leaving = bool(cfg.run.exit_interval) and step + 1 - start >= cfg.run.exit_interval
            if final or leaving or (cfg.run.save_every and (step + 1) % cfg.run.save_every == 0):
                save_training_checkpoint(out, step, hf_dir=tokenizer_dir(cfg.student.path), **checkpoint)
            if leaving:
                break
        logger.close()
        if parts.eval_dataset is not None and last.get("step") == cfg.train.steps - 1:
            evals["after"] = _evaluate(trainer, parts.eval_dataset, cfg.eval.limit)
            _report(ctx, "held-out after", evals["after"])
        if ctx.rank == 0:
            summary = {"final": last, "skipped_steps": trainer.skipped_steps, "out_dir": out, "eval": evals}
            (Path(out) / "summary.json").write_text(json.dumps(summary, indent=2))
            print(json.dumps(summary))
        return {**last, **{f"{k}_{m}": v for k, d in evals.items() for m, v in d.items()}}
    finally:
        if dist.is_initialized():
            destroy_parallel()


def _evaluate(trainer: Trainer, evalset, limit: int) -> dict:
    """Held-out accuracy sampled at T=1.0 (the paper's setting) and greedy."""
    return {**trainer.evaluate(evalset, limit=limit, temperature=1.0),
            **trainer.evaluate(evalset, limit=limit, temperature=0.0)}


def _report(ctx, title: str, metrics: dict) -> None:
    if ctx.rank == 0:
        print(f"{title}: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()), flush=True)


if __name__ == "__main__":
    main()
