"""End-to-end conversions (``python -m megatron_tip.convert`` and tests).

Every input check runs in the calling process before any rank starts or any file is written;
outputs go to a temp dir beside the target and are renamed into place only when complete.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Optional

import torch

from megatron_tip.checkpoint.layout import (
    HF_DIR, MODEL_DIR, check_output_dir, check_separate, commit_dir, copy_hf_aux_files, is_hf_dir,
    read_checkpoint_info, read_spec, temp_dir_for,
)
from megatron_tip.checkpoint.model import check_integrity, load_megatron_checkpoint, save_megatron_checkpoint
from megatron_tip.checkpoint.safe_load import verify_dist_checkpoint
from megatron_tip.launch import run_distributed
from megatron_tip.models.hf.families import save_hf_config
from megatron_tip.models.hf.mapping import all_names, canonical_to_hf
from megatron_tip.models.hf.weights import HFCheckpointReader, check_hf_checkpoint, load_hf_weights, save_hf_safetensors
from megatron_tip.models.spec import ModelSpec

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


def read_hf_spec(hf_dir: str | os.PathLike) -> ModelSpec:
    """ModelSpec of an HF checkpoint dir (FileNotFoundError without config.json)."""
    if not is_hf_dir(hf_dir):
        raise FileNotFoundError(f"no config.json in {str(hf_dir)!r}")
    return read_spec(hf_dir)


def hf_dtype(spec: ModelSpec) -> Optional[torch.dtype]:
    """The dtype named by the HF config (``dtype`` / ``torch_dtype``), if any."""
    name = spec.extra_hf_config.get("dtype") or spec.extra_hf_config.get("torch_dtype")
    return DTYPES.get(str(name)) if name else None


def resolve_dtype(name: str, spec: ModelSpec) -> torch.dtype:
    if name == "auto":
        return hf_dtype(spec) or torch.float32
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; use auto, {', '.join(sorted(DTYPES))}")
    return DTYPES[name]


def _in_launcher(world: int) -> bool:
    return "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) == world


def _hf_to_megatron_rank(rank: int, world: int, hf_dir: str, out: str, tp: int, pp: int,
                         dtype: torch.dtype, overwrite: bool) -> None:
    from megatron_tip.distributed import init_parallel
    from megatron_tip.models import build_gpt_model
    from megatron_tip.models.sharding import layer_offset

    spec = read_hf_spec(hf_dir)
    ctx = init_parallel(tp, pp=pp)
    model = build_gpt_model(spec, tp=tp, pp=pp, pp_rank=ctx.pp_rank, params_dtype=dtype)
    if ctx.rank == 0:
        print(f"[convert] loading {hf_dir} into {tp}x{pp} (TPxPP) megatron ranks", flush=True)
    load_hf_weights(model, hf_dir, spec=spec, tp=tp, tp_rank=ctx.tp_rank,
                    layer_offset=layer_offset(spec.num_layers, pp=pp, pp_rank=ctx.pp_rank))
    if ctx.rank == 0:
        print(f"[convert] writing megatron checkpoint {out}", flush=True)
    save_megatron_checkpoint(model, out, spec=spec, tp=tp, pp=pp, hf_dir=hf_dir,
                             source=str(Path(hf_dir).absolute()), overwrite=overwrite)


def hf_to_megatron(hf_dir: str | os.PathLike, out: str | os.PathLike, *, tp: int = 1, pp: int = 1,
                   dtype: str = "auto", overwrite: bool = False, timeout: float = 3600.0) -> None:
    """Convert an HF checkpoint dir into a megatron checkpoint dir written at TP x PP.

    Spawns tp*pp gloo ranks, or runs in place when already launched with that world size.
    """
    from megatron_tip.models import check_model_parallel

    spec = read_hf_spec(hf_dir)
    check_hf_checkpoint(HFCheckpointReader(hf_dir), spec)
    check_model_parallel(spec, tp=tp, pp=pp)
    check_separate(hf_dir, out)
    check_output_dir(out, overwrite=overwrite)
    torch_dtype = resolve_dtype(dtype, spec)
    args = (str(hf_dir), str(out), tp, pp, torch_dtype, overwrite)
    if _in_launcher(tp * pp):
        _hf_to_megatron_rank(int(os.environ["RANK"]), tp * pp, *args)
        return
    try:
        run_distributed(_hf_to_megatron_rank, tp * pp, *args, timeout=timeout)
    finally:
        tmp = temp_dir_for(out)
        if tmp.exists():  # a rank died mid-save: leave nothing behind
            shutil.rmtree(tmp, ignore_errors=True)


def model_canonical(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Canonical view (no copies) of a single-stage TP=1 model's parameters."""
    return {n: p.detach() for n, p in model.named_parameters()}


def _megatron_to_hf_rank(rank: int, world: int, megatron_dir: str, tmp: str, max_shard_bytes: int,
                         dtype: Optional[torch.dtype], progress: bool) -> list[str]:
    from megatron_tip.distributed import init_parallel
    from megatron_tip.models import build_gpt_model

    spec, meta = read_checkpoint_info(megatron_dir)
    init_parallel(1)
    params_dtype = DTYPES.get(meta.get("params_dtype", "float32"), torch.float32)
    model = build_gpt_model(spec, params_dtype=params_dtype)
    load_megatron_checkpoint(model, megatron_dir, verify=False)  # megatron_to_hf verified it
    total = sum(len(hf) for _, _, hf in all_names(spec))
    stream = canonical_to_hf(model_canonical(model), spec)
    return save_hf_safetensors(stream, tmp, max_shard_bytes=max_shard_bytes, dtype=dtype,
                               progress=progress, total=total)


def megatron_to_hf(megatron_dir: str | os.PathLike, out: str | os.PathLike, *, overwrite: bool = False,
                   max_shard_bytes: int = 5 * 2**30, dtype: str = "auto", progress: bool = False,
                   timeout: float = 3600.0) -> list[str]:
    """Export a megatron checkpoint dir (any layout) as an HF checkpoint dir; returns weight files.

    Loads at TP=1, PP=1 in one process (dist_checkpointing reshards), streams tensors to shards.
    ``dtype`` "auto": the HF config's dtype, else the checkpoint's parameter dtype.
    """
    spec, _ = read_checkpoint_info(megatron_dir)
    check_separate(megatron_dir, out)
    check_output_dir(out, overwrite=overwrite)
    check_integrity(megatron_dir, collective=False)  # before any rank starts or anything is written
    verify_dist_checkpoint(Path(megatron_dir) / MODEL_DIR)  # the rank checks again; this names it in one line
    torch_dtype = None if dtype == "auto" and hf_dtype(spec) is None else resolve_dtype(dtype, spec)
    tmp = temp_dir_for(out)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        files = run_distributed(_megatron_to_hf_rank, 1, str(megatron_dir), str(tmp), max_shard_bytes,
                                torch_dtype, progress, timeout=timeout)[0]
        copy_hf_aux_files(Path(megatron_dir) / HF_DIR, tmp, skip=("config.json",))
        save_hf_config(spec, tmp)
        commit_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return files
