"""Run directories and trainer checkpoints: identity, save, resume, cleanup.

A run directory belongs to one run: ``run.json`` (written when the run starts) holds a run id and
the fingerprint of every config value that shapes training. Resuming verifies the fingerprint,
so a run never continues from another run's checkpoints; a fresh run into a directory that holds
another run is refused unless ``run.overwrite`` says to replace it.

A trainer checkpoint is a megatron checkpoint dir (student weights, any layout) plus per-rank
optimizer/scheduler state and ``trainer_state.json``, written last and atomically (see
``checkpoint.layout``); a checkpoint whose state file is missing or unreadable is incomplete.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
import zipfile
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from megatron_tip.checkpoint.config import RunDirConfig
from megatron_tip.checkpoint.disk_full import reports_disk_full
from megatron_tip.checkpoint.layout import (
    CHECKPOINTS_DIR, TRAINER_STATE, optim_file, read_json_object, step_dir, step_dirs,
)
from megatron_tip.checkpoint.manifest import CorruptCheckpointError, lists, verify_checkpoint, write_manifest
from megatron_tip.checkpoint.model import load_megatron_checkpoint, save_megatron_checkpoint
from megatron_tip.checkpoint.safe_load import load_tensors
from megatron_tip.models.spec import ModelSpec

RUN_FILE = "run.json"
# Written by a run into its directory; removed when run.overwrite replaces the run.
EVALS_FILE = "evals.json"  # held-out evaluations, written when each is computed (survive a resume)
RUN_OUTPUTS = (RUN_FILE, CHECKPOINTS_DIR, "metrics.jsonl", "tensorboard", "summary.json", "config.json", EVALS_FILE)
# Config sections/keys that may change between invocations of one run (where and how it is
# written, how it is evaluated); everything else is part of the run's identity.
_VOLATILE = ("run", "log", "eval")


def config_fingerprint(config: dict[str, Any]) -> str:
    """sha256 of the config values that shape training (all but the run/log/eval sections)."""
    core = {k: v for k, v in config.items() if k not in _VOLATILE}
    return hashlib.sha256(json.dumps(core, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        if k in _VOLATILE and not prefix:
            continue
        x, y = a.get(k), b.get(k)
        if isinstance(x, dict) and isinstance(y, dict):
            out += _differences(x, y, f"{prefix}{k}.")
        elif x != y:
            out.append(f"{prefix}{k}: {x!r} -> {y!r}")
    return out


def read_trainer_state(ckpt: Path) -> Optional[dict]:
    """The checkpoint's trainer state, or None when the checkpoint is incomplete: the state file
    missing or unreadable, or the save stopped before its last act (a manifest without it)."""
    try:
        state = json.loads((ckpt / TRAINER_STATE).read_bytes())
    except (OSError, ValueError, RecursionError):
        return None
    if not (isinstance(state, dict) and isinstance(state.get("step"), int)):
        return None
    return state if lists(ckpt, TRAINER_STATE) else None


def complete_checkpoints(out_dir: str | os.PathLike) -> list[tuple[Path, dict]]:
    """(dir, trainer state) of the complete checkpoints of a run, oldest first (not yet verified:
    see ``usable_checkpoint``)."""
    out = []
    for p in step_dirs(out_dir):
        state = read_trainer_state(p)
        if state is not None:
            out.append((p, state))
    return out


def read_run_record(out_dir: str | os.PathLike) -> Optional[dict]:
    """``run.json`` of a run directory (None when absent); ValueError naming the file when it is
    not a JSON object."""
    path = Path(out_dir) / RUN_FILE
    return read_json_object(path) if path.is_file() else None


def check_identity(ckpt: Path, state: dict, *, run_id: Optional[str]) -> None:
    """ValueError unless the checkpoint is this run's (its run id) and its step is its directory's."""
    name = ckpt.name.removeprefix("step_")
    if not name.isdigit() or int(name) != state["step"]:
        raise ValueError(f"checkpoint {ckpt}: {TRAINER_STATE} says step {state['step']}, its directory name says "
                         f"{ckpt.name}: it was renamed or edited; remove it (the previous checkpoint is then used)")
    if run_id is not None and state.get("run_id") != run_id:
        raise ValueError(f"checkpoint {ckpt} belongs to run {state.get('run_id')}, but {ckpt.parents[1] / RUN_FILE} "
                         f"is run {run_id} (copied in from another run?): remove it, or resume that run in its "
                         f"own directory")


def usable_checkpoint(out_dir: str | os.PathLike, *, collective: bool = False,
                      rank: int = 0) -> tuple[Path, dict, bool]:
    """(dir, trainer state, verified?) of the newest complete checkpoint whose files match its manifest.

    A damaged one is reported in one line (rank 0) and the previous one is tried; one of another
    run or whose step disagrees with its name is refused (ValueError). ``verified`` is False for
    a checkpoint written before manifests existed (used as it is). ``collective``: every rank
    calls (checksums are spread over ranks).
    """
    root = Path(out_dir) / CHECKPOINTS_DIR
    done = complete_checkpoints(out_dir)
    if not done:
        raise FileNotFoundError(f"no complete checkpoint under {root}")
    record = read_run_record(out_dir)
    run_id = record.get("run_id") if record is not None else None
    for ckpt, state in reversed(done):
        check_identity(ckpt, state, run_id=run_id)
        try:
            return ckpt, state, verify_checkpoint(ckpt, collective=collective)
        except CorruptCheckpointError as e:
            if rank == 0:
                print(f"warning: checkpoint {ckpt.name} is damaged, not resuming from it: {e}", flush=True)
    raise CorruptCheckpointError(f"no checkpoint under {root} matches its manifest (see the warnings above): "
                                 f"restore one, or start again with run.resume=false run.overwrite=true")


def _write_json_atomic(path: Path, value: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(value, indent=2))
    os.replace(tmp, path)


def prepare_run_dir(config: dict[str, Any], cfg: RunDirConfig) -> tuple[dict, bool]:
    """Rank 0, holding the run lock: decide fresh start vs resume. Writes nothing.

    Returns (run record, resume?); a fresh run's record is written by :func:`claim_run_dir` only
    once the run has started, so a start that fails (a bad path, a missing file) leaves the
    directory as it was and the corrected command runs. Raises ValueError naming the problem when
    the directory holds another run (fresh run without overwrite, or a resume whose config differs).
    """
    out = Path(cfg.out_dir)
    fingerprint = config_fingerprint(config)
    record = read_run_record(out)
    has_ckpts = bool(complete_checkpoints(out))
    if cfg.resume in ("true", "auto") and (record is not None or has_ckpts):
        if record is None:
            raise ValueError(f"{out} holds checkpoints but no {RUN_FILE} (another or an older run): "
                             f"start a new run elsewhere, or pass run.resume=false run.overwrite=true to replace it")
        if record.get("fingerprint") != fingerprint:
            diff = _differences(record.get("config", {}), config)
            raise ValueError(f"{out} belongs to run {record.get('run_id')} with another config "
                             f"({'; '.join(diff[:5]) or 'fingerprint differs'}): resume with the same config "
                             f"or start a new run in another run.out_dir")
        if cfg.resume == "true" and not has_ckpts:
            raise FileNotFoundError(f"run.resume=true but no complete checkpoint under {out / CHECKPOINTS_DIR}")
        return record, has_ckpts
    if cfg.resume == "true":
        raise FileNotFoundError(f"run.resume=true but no complete checkpoint under {out / CHECKPOINTS_DIR}")
    taken = _taken(out) if cfg.resume == "false" else []
    if taken and not cfg.overwrite:
        raise ValueError(f"{out} already holds a run ({', '.join(taken)}): pass run.resume=auto to continue it, "
                         f"run.overwrite=true to replace it, or choose another run.out_dir")
    return {"run_id": uuid.uuid4().hex[:12], "fingerprint": fingerprint,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "config": config}, False


def claim_run_dir(record: dict, cfg: RunDirConfig, *, resuming: bool) -> None:
    """Rank 0, once the run has started (models built): make ``out_dir`` the run of ``record``.

    A fresh run replaces what ``run.overwrite`` said to replace, drops incomplete checkpoints and
    writes ``run.json``; a resumed run's directory is already its own.
    """
    out = Path(cfg.out_dir)
    if resuming:
        return
    for name in _taken(out) if cfg.resume == "false" else []:  # prepare_run_dir refused these without overwrite
        target = out / name
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    remove_incomplete_checkpoints(str(out))
    out.mkdir(parents=True, exist_ok=True)
    _write_json_atomic(out / RUN_FILE, record)


def _taken(out: Path) -> list[str]:
    return [name for name in RUN_OUTPUTS if (out / name).exists()]


@reports_disk_full
def save_training_checkpoint(out_dir: str, step: int, *, model: torch.nn.Module, optimizer: Any,
                             scheduler: Any, spec: ModelSpec, ctx: Any, hf_dir: str, run_id: str,
                             state: Optional[dict[str, Any]] = None) -> Path:
    """Collective: student weights (dist_checkpointing) + optimizer/scheduler + step, atomically.

    ``state``: more trainer counters for ``trainer_state.json`` (e.g. ``skipped_steps``), read back
    with :func:`read_trainer_state`.
    """
    final = step_dir(out_dir, step)
    save_megatron_checkpoint(model, final, spec=spec, tp=ctx.tp, pp=ctx.pp, hf_dir=hf_dir,
                             overwrite=True, extra_metadata={"step": step, "run_id": run_id})
    # Optimizer state per rank (same layout on resume), written beside, then the marker.
    target = optim_file(final, ctx.rank)
    tmp = target.with_name(target.name + ".tmp")
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp)
    os.replace(tmp, target)
    if _is_distributed(optimizer):  # sharded fp32 params + Adam state: gathered to DP rank 0 per model rank
        optimizer.save_parameter_state(str(_param_state_file(final, ctx)))  # collective over DP
    dist.barrier()
    if ctx.rank == 0:
        _write_json_atomic(final / TRAINER_STATE, {**(state or {}), "step": step, "world_size": ctx.world_size,
                                                   "tp": ctx.tp, "pp": ctx.pp, "run_id": run_id})
    dist.barrier()
    write_manifest(final, extend=True, collective=True)  # last act: the model part's manifest + the rest
    dist.barrier()
    return final


def resume_training(out_dir: str, *, model: torch.nn.Module, optimizer: Any, scheduler: Any,
                    spec: ModelSpec, ctx: Any) -> int:
    """Load the newest complete checkpoint under ``out_dir`` that verifies; returns the next step to run."""
    ckpt, state, verified = usable_checkpoint(out_dir, collective=True, rank=ctx.rank)
    if (state.get("world_size"), state.get("tp"), state.get("pp")) != (ctx.world_size, ctx.tp, ctx.pp):
        raise ValueError(f"checkpoint {ckpt} was written at world={state.get('world_size')} tp={state.get('tp')} "
                         f"pp={state.get('pp')}; resume needs the same layout (optimizer state is per rank)")
    if not verified and ctx.rank == 0:
        print(f"warning: {ckpt} has no manifest.json (written before integrity checks): resuming unverified",
              flush=True)
    try:
        load_megatron_checkpoint(model, ckpt, vocab_size=spec.vocab_size, verify=False)
        opt = load_tensors(optim_file(ckpt, ctx.rank))
        optimizer.load_state_dict(opt["optimizer"])
        scheduler.load_state_dict(opt["scheduler"])
        if _is_distributed(optimizer):
            path = _param_state_file(ckpt, ctx)
            if ctx.dp_rank == 0:
                load_tensors(path)  # refuse planted pickles before megatron's own torch.load reads the file
            optimizer.load_parameter_state(str(path))
    except (EOFError, RuntimeError, KeyError, TypeError, OSError, zipfile.BadZipFile) as e:
        # Only an unverified (older) checkpoint gets here with damaged files.
        raise CorruptCheckpointError(f"checkpoint {ckpt} cannot be loaded ({type(e).__name__}: "
                                     f"{str(e).splitlines()[0] if str(e) else ''}); remove it to resume from "
                                     f"the previous one") from e
    if ctx.rank == 0:
        print(f"resuming from {ckpt} (step {state['step']})", flush=True)
    return int(state["step"]) + 1


def _is_distributed(optimizer: Any) -> bool:
    inner = getattr(optimizer, "chained_optimizers", [optimizer])
    return any(hasattr(o, "get_parameter_state_dp_zero") for o in inner)


def _param_state_file(ckpt: Path, ctx: Any) -> Path:
    return ckpt / f"dist_optim_tp{ctx.tp_rank:03d}_pp{ctx.pp_rank:03d}.pt"


def remove_incomplete_checkpoints(out_dir: str) -> None:
    """Drop step dirs without a readable trainer_state.json and stale temp dirs (a run killed mid-save)."""
    for p in step_dirs(out_dir):
        if read_trainer_state(p) is None:
            shutil.rmtree(p, ignore_errors=True)
    root = Path(out_dir) / CHECKPOINTS_DIR
    for tmp in root.glob(".step_*.tmp") if root.is_dir() else []:  # checkpoint.layout.temp_dir_for
        shutil.rmtree(tmp, ignore_errors=True)
