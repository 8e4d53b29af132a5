"""Entry point: python -m megatron_tip.train --config CONFIG.yaml [key.sub=value ...]

Works as a single process (CPU default), under torchrun, and under srun (see slurm/). Exit codes:
0 done; 2 a user error (one line naming the key, file or value; --debug shows the traceback);
1 the run failed (e.g. too many skipped steps); 75 stopped by SIGTERM/SIGUSR1/SIGINT after saving a
checkpoint (continue with run.resume=auto).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path

import torch.distributed as dist

from megatron_tip.build import build
from megatron_tip.checkpoint import read_spec, tokenizer_dir
from megatron_tip.checkpoint.training import (prepare_run_dir, remove_incomplete_checkpoints, resume_training,
                                              save_training_checkpoint)
from megatron_tip.config import RunConfig, load_config
from megatron_tip.distributed import ParallelContext, destroy_parallel, init_parallel
from megatron_tip.metrics_log import MetricsLogger
from megatron_tip.preemption import EXIT_PREEMPTED, StopRequest
from megatron_tip.trainer import Trainer

USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError)


class RunFailed(RuntimeError):
    """The run cannot produce a useful model (exit code 1)."""


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="YAML run config (examples/configs/*.yaml)")
    ap.add_argument("--debug", action="store_true", help="show tracebacks for user errors (or MEGATRON_TIP_DEBUG=1)")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. selection.keep_ratio=0.2")
    args = ap.parse_args(argv)
    debug = args.debug or os.environ.get("MEGATRON_TIP_DEBUG") == "1"
    try:
        return run(load_config(args.config, args.overrides))
    except RunFailed as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    except USER_ERRORS as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def run(cfg: RunConfig) -> dict:
    """Train ``cfg`` in this process (one rank of the world); returns the last step's metrics + evals."""
    stop = StopRequest(rank=int(os.environ.get("RANK", "0")))
    ctx = init_parallel(cfg.parallel.tensor_parallel, pp=cfg.parallel.pipeline_parallel, seed=cfg.train.seed)
    try:
        with contextlib.ExitStack() as cleanup:  # closes the rollout engine before the groups go
            return _train(cfg, ctx, stop, cleanup)
    finally:
        stop.restore()
        if dist.is_initialized():
            destroy_parallel()


def _claim_run_dir(cfg: RunConfig, ctx: ParallelContext) -> tuple[dict, bool]:
    """Rank 0 decides fresh vs resume (and refuses another run's directory); every rank learns it."""
    box: list = [None]
    if ctx.rank == 0:
        try:
            box[0] = prepare_run_dir(cfg.to_dict(), cfg.run)
            if not box[0][1]:
                remove_incomplete_checkpoints(cfg.run.out_dir)
        except USER_ERRORS as e:
            box[0] = e
    dist.broadcast_object_list(box, src=0)
    if isinstance(box[0], Exception):
        raise box[0]
    return box[0]


def _preflight(cfg: RunConfig, ctx: ParallelContext) -> None:
    """Print the planner's memory (and, on GPUs, step-time) estimate before any model loads."""
    from megatron_tip.plan import preflight

    try:
        specs = read_spec(cfg.student.path), read_spec(cfg.teacher.path)
    except (OSError, ValueError):  # build() names the bad path with the full message
        return
    try:
        print(preflight(cfg, ctx, *specs), flush=True)
    except Exception as e:  # an estimate must never stop a run
        print(f"preflight plan skipped ({type(e).__name__}: {e})", flush=True)


def _train(cfg: RunConfig, ctx: ParallelContext, stop: StopRequest, cleanup: contextlib.ExitStack) -> dict:
    out = Path(cfg.run.out_dir)
    record, resuming = _claim_run_dir(cfg, ctx)
    if ctx.rank == 0 and cfg.log.preflight:
        _preflight(cfg, ctx)
    parts = build(cfg, ctx)
    cleanup.callback(parts.engine.close)  # vLLM: shut down before destroy_parallel, or it tracebacks at exit
    checkpoint = dict(model=parts.student.module, optimizer=parts.optimizer, scheduler=parts.scheduler,
                      spec=parts.student_spec, ctx=ctx)
    start = resume_training(str(out), **checkpoint) if resuming else 0
    previous = json.loads((out / "summary.json").read_text()) if resuming and (out / "summary.json").is_file() else {}
    if start >= cfg.train.steps:
        _report(ctx, f"run {record['run_id']} in {out} already finished all {cfg.train.steps} steps; nothing to do")
        return {**previous.get("final", {}), **_flat(previous.get("eval", {}))}
    if ctx.rank == 0:
        (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    trainer = Trainer(cfg, ctx, parts)
    if start:
        trainer.sync_weights()  # the rollout engine started from student.path, not the resumed weights
    logger = MetricsLogger(str(out), enabled=ctx.rank == 0, total_steps=cfg.train.steps, start_step=start,
                           tensorboard=cfg.log.tensorboard)
    evals: dict = dict(previous.get("eval", {}))  # a resumed run keeps its "before" evaluation
    if parts.eval_dataset is not None and start == 0 and cfg.eval.before:
        evals["before"] = _evaluate(trainer, parts.eval_dataset, cfg.eval.limit)
        _report(ctx, "held-out before: " + _fmt(evals["before"]))
    save = lambda step: save_training_checkpoint(str(out), step, hf_dir=tokenizer_dir(cfg.student.path),  # noqa: E731
                                                 run_id=record["run_id"], **checkpoint)
    last: dict = {}
    try:
        for step in range(start, cfg.train.steps):
            last = trainer.train_step(step)
            logger.log(last)
            if trainer.skipped_steps > cfg.train.max_skipped_fraction * cfg.train.steps:
                raise RunFailed(f"{trainer.skipped_steps} of {step + 1} steps skipped (see the lines above), more "
                                f"than train.max_skipped_fraction={cfg.train.max_skipped_fraction:g} of "
                                f"train.steps={cfg.train.steps}; check the teacher and student weights")
            signum = stop.agreed(ctx.device)
            final = step == cfg.train.steps - 1
            leaving = bool(cfg.run.exit_interval) and step + 1 - start >= cfg.run.exit_interval
            if final or leaving or signum or (cfg.run.save_every and (step + 1) % cfg.run.save_every == 0):
                path = save(step)
            if signum and not final:
                _report(ctx, f"preempted at step {step} ({_signame(signum)}): checkpoint saved to {path}; "
                             f"continue with run.resume=auto")
                raise SystemExit(EXIT_PREEMPTED)
            if leaving:
                break
    finally:
        logger.close()
    if parts.eval_dataset is not None and last.get("step") == cfg.train.steps - 1:
        evals["after"] = _evaluate(trainer, parts.eval_dataset, cfg.eval.limit)
        _report(ctx, "held-out after: " + _fmt(evals["after"]))
    if ctx.rank == 0:
        summary = {"run_id": record["run_id"], "final": last, "skipped_steps": trainer.skipped_steps,
                   "out_dir": str(out), "eval": evals}
        tmp = out / ".summary.json.tmp"
        tmp.write_text(json.dumps(summary, indent=2))
        tmp.replace(out / "summary.json")
        print(json.dumps(summary))
    return {**last, **_flat(evals)}


def _evaluate(trainer: Trainer, evalset, limit: int) -> dict:
    """Held-out accuracy sampled at T=1.0 (the paper's setting) and greedy."""
    return {**trainer.evaluate(evalset, limit=limit, temperature=1.0),
            **trainer.evaluate(evalset, limit=limit, temperature=0.0)}


def _flat(evals: dict) -> dict:
    return {f"{k}_{m}": v for k, d in evals.items() for m, v in d.items()}


def _fmt(metrics: dict) -> str:
    return ", ".join(f"{k}={v:.4g}" for k, v in metrics.items())


def _signame(signum: int) -> str:
    import signal

    return signal.Signals(signum).name


def _report(ctx: ParallelContext, line: str) -> None:
    if ctx.rank == 0:
        print(line, flush=True)


if __name__ == "__main__":
    main()
