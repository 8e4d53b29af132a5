"""Entry point: python -m megatron_tip.train --config CONFIG.yaml [key.sub=value ...]

Works as a single process (CPU default), under torchrun, and under srun (see slurm/). Exit codes:
0 done; 2 a user error (one line naming the key, file or value; --debug shows the traceback),
another process holding the run directory included; 1 the run failed (e.g. too many skipped
steps); 75 stopped by SIGTERM/SIGUSR1/SIGHUP/SIGINT after saving a checkpoint (continue with
run.resume=auto). Under torchrun the job's exit code is torchrun's: 1 for any worker exit but 0.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

from megatron_tip.third_party_warnings import filter_third_party_warnings

filter_third_party_warnings()  # before megatron-core is imported: most of them fire at import

import torch.distributed as dist  # noqa: E402

from megatron_tip.build import build  # noqa: E402
from megatron_tip.checkpoint import read_spec, tokenizer_dir  # noqa: E402
from megatron_tip.checkpoint.layout import step_dir  # noqa: E402
from megatron_tip.checkpoint.run_lock import lock_run_dir  # noqa: E402
from megatron_tip.checkpoint.training import (EVALS_FILE, claim_run_dir, prepare_run_dir,  # noqa: E402
                                              read_trainer_state, resume_training, save_training_checkpoint)
from megatron_tip.config import RunConfig, load_config  # noqa: E402
from megatron_tip.distributed import ParallelContext, destroy_parallel, init_parallel  # noqa: E402
from megatron_tip.metrics_log import MetricsLogger, final_report  # noqa: E402
from megatron_tip.run_checks import check_inputs  # noqa: E402
from megatron_tip.preemption import EXIT_PREEMPTED, StopRequest  # noqa: E402
from megatron_tip.trainer import Trainer  # noqa: E402

USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError)
SUMMARY = "summary.json"  # written last: a run is finished when it exists


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
        cfg = load_config(args.config, args.overrides)
        check_inputs(cfg)  # every path, both model specs, the layout: before the process group or run dir
        return run(cfg)
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


def _open_run_dir(cfg: RunConfig, ctx: ParallelContext, cleanup: contextlib.ExitStack) -> tuple[dict, bool]:
    """Rank 0 locks out_dir for the life of the run, then decides fresh vs resume; every rank learns it."""
    box: list = [None]
    if ctx.rank == 0:
        try:
            cleanup.callback(lock_run_dir(cfg.run.out_dir).release)
            box[0] = prepare_run_dir(cfg.to_dict(), cfg.run)
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
    t_start = time.monotonic()
    out = Path(cfg.run.out_dir)
    record, resuming = _open_run_dir(cfg, ctx, cleanup)
    previous = _read_json(out / SUMMARY) if resuming else None
    if previous is not None:  # the summary is written last: this run is done
        _report(ctx, f"run {record['run_id']} in {out} already finished all {cfg.train.steps} steps; nothing to do")
        return {**previous.get("final", {}), **_flat(previous.get("eval", {}))}
    if ctx.rank == 0 and cfg.log.preflight:
        _preflight(cfg, ctx)
    parts = build(cfg, ctx)
    cleanup.callback(parts.engine.close)  # vLLM: shut down before destroy_parallel, or it tracebacks at exit
    if ctx.rank == 0:  # the run has started: only now is out_dir claimed (a failed start leaves it as it was)
        claim_run_dir(record, cfg.run, resuming=resuming)
    checkpoint = dict(model=parts.student.module, optimizer=parts.optimizer, scheduler=parts.scheduler,
                      spec=parts.student_spec, ctx=ctx)
    start = resume_training(str(out), **checkpoint) if resuming else 0
    if ctx.rank == 0:
        (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    trainer = Trainer(cfg, ctx, parts)
    # Counters and evaluations of earlier invocations of this run (a fresh start has none).
    evals: dict = (_read_json(out / EVALS_FILE) or {}) if start else {}
    if start:
        trainer.skipped_steps = int((read_trainer_state(step_dir(out, start - 1)) or {}).get("skipped_steps", 0))
        trainer.sync_weights()  # the rollout engine started from student.path, not the resumed weights
    if parts.eval_dataset is not None and start == 0 and cfg.eval.before:
        evals["before"] = _evaluate(trainer, parts.eval_dataset, cfg.eval.limit)
        _save_evals(ctx, out, evals)
        _report(ctx, "held-out before: " + _fmt(evals["before"]))
    save = lambda step: save_training_checkpoint(  # noqa: E731
        str(out), step, hf_dir=tokenizer_dir(cfg.student.path), run_id=record["run_id"],
        state={"skipped_steps": trainer.skipped_steps}, **checkpoint)
    if start < cfg.train.steps:
        last = _train_steps(cfg, ctx, stop, trainer, save, out, start)
        if last.get("step") != cfg.train.steps - 1:  # left early (run.exit_interval)
            return {**last, **_flat(evals)}
    else:  # the final checkpoint exists but not the summary: the run died in its "after" evaluation
        _report(ctx, f"all {cfg.train.steps} steps are done (checkpoint {step_dir(out, start - 1).name}); "
                     f"finishing the run")
        last = _logged_step(out / "metrics.jsonl", cfg.train.steps - 1)
    if parts.eval_dataset is not None:
        evals["after"] = _evaluate(trainer, parts.eval_dataset, cfg.eval.limit)
        _save_evals(ctx, out, evals)
        _report(ctx, "held-out after: " + _fmt(evals["after"]))
    if ctx.rank == 0:
        summary = {"run_id": record["run_id"], "final": last, "skipped_steps": trainer.skipped_steps,
                   "steps": cfg.train.steps, "time_s": round(time.monotonic() - t_start, 1),
                   "out_dir": str(out), "eval": evals}
        _write_atomic(out / SUMMARY, json.dumps(summary, indent=2))
        print(final_report(summary, out / SUMMARY), flush=True)
    return {**last, **_flat(evals)}


def _train_steps(cfg: RunConfig, ctx: ParallelContext, stop: StopRequest, trainer: Trainer, save, out: Path,
                 start: int) -> dict:
    """Steps start.. until the end, run.exit_interval or a stop signal; returns the last step's metrics."""
    logger = MetricsLogger(str(out), enabled=ctx.rank == 0, total_steps=cfg.train.steps, start_step=start,
                           tensorboard=cfg.log.tensorboard)
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
                logger.write(f"preempted at step {step} ({_signame(signum)}): checkpoint saved to {path}; "
                             f"continue with run.resume=auto")
                raise SystemExit(EXIT_PREEMPTED)
            if leaving:
                break
    finally:
        logger.close()
    return last


def _read_json(path: Path):
    """A JSON file of this run, or None when it does not exist."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path} is not valid JSON ({e}): restore or delete it") from None


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _save_evals(ctx: ParallelContext, out: Path, evals: dict) -> None:
    """Persist the evaluations as soon as each exists (a preempted run keeps its "before")."""
    if ctx.rank == 0:
        _write_atomic(out / EVALS_FILE, json.dumps(evals, indent=2))


def _logged_step(path: Path, step: int) -> dict:
    """The metrics.jsonl line of ``step`` (the last one wins), {} when it is not there."""
    found: dict = {}
    for line in path.read_text(errors="replace").splitlines() if path.is_file() else []:
        try:
            rec = json.loads(line)
        except ValueError:  # a line cut by a crash mid-write
            continue
        if isinstance(rec, dict) and rec.get("step") == step:
            found = rec
    return found


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
