"""Megatron model weights in and out of checkpoint directories (format: ``checkpoint.layout``).

``save_megatron_checkpoint`` / ``load_megatron_checkpoint`` go through megatron's
dist_checkpointing, so a checkpoint saved at one TP x PP loads at any other. ``load_weights``
fills a model stage from either source a config may name: an HF dir or a megatron checkpoint.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from megatron_tip.checkpoint.layout import (
    FORMAT, HF_DIR, META_FILE, MODEL_DIR, SPEC_FILE, check_output_dir, commit_dir, copy_hf_aux_files,
    is_hf_dir, read_checkpoint_info, temp_dir_for,
)
from megatron_tip.checkpoint.inprocess_save import save_strategy
from megatron_tip.checkpoint.manifest import verify_checkpoint, write_manifest
from megatron_tip.checkpoint.safe_load import verify_dist_checkpoint
from megatron_tip.models.spec import ModelSpec


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save_megatron_checkpoint(model: torch.nn.Module, ckpt_dir: str | os.PathLike, *, spec: ModelSpec,
                             tp: int, pp: int, hf_dir: Optional[str | os.PathLike] = None,
                             source: Optional[str] = None, overwrite: bool = False,
                             extra_metadata: Optional[dict[str, Any]] = None) -> None:
    """Collective over all ranks: write ``model`` (this rank's stage/shard) as a checkpoint dir.

    Raises CheckpointExistsError (on every rank, before any write) when the target is taken.
    """
    from megatron.core import dist_checkpointing

    check_output_dir(ckpt_dir, overwrite=overwrite)
    tmp = temp_dir_for(ckpt_dir)
    if _rank() == 0:
        if tmp.exists():
            shutil.rmtree(tmp)
        (tmp / MODEL_DIR).mkdir(parents=True)
    _barrier()
    try:
        # Written by threads of this process (no forked writers to orphan or signal): inprocess_save.
        dist_checkpointing.save(model.sharded_state_dict(), str(tmp / MODEL_DIR), sharded_strategy=save_strategy())
        _barrier()
        if _rank() == 0:
            spec.save(tmp / SPEC_FILE)
            copy_hf_aux_files(hf_dir, tmp / HF_DIR)
            dtype = next(model.parameters()).dtype
            meta = {"format": FORMAT, "tp": tp, "pp": pp, "params_dtype": str(dtype).removeprefix("torch."),
                    "vocab_size": spec.vocab_size, "source": source or (str(hf_dir) if hf_dir else None)}
            meta.update(extra_metadata or {})
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
            write_manifest(tmp)  # last: what the complete checkpoint holds (checkpoint.manifest)
            commit_dir(tmp, ckpt_dir)
    except BaseException:
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    _barrier()


def _vocab_fixups(sharded: dict, ckpt_model_dir: str) -> dict[str, Any]:
    """Load vocab tensors saved with another padding (another TP) as full replicated tensors.

    Megatron pads the vocab to a multiple of 128*TP, so e.g. 151,936 rows are 151,936 at TP=1
    but 152,064 at TP=2; dist_checkpointing cannot reshard across different global shapes.
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedTensor

    saved = dist_checkpointing.load_tensors_metadata(ckpt_model_dir)
    fixups = {}
    for k, sh in list(sharded.items()):
        if not isinstance(sh, ShardedTensor) or not k.endswith(("word_embeddings.weight", "output_layer.weight")):
            continue
        meta = saved.get(sh.key)
        if meta is None or tuple(meta.global_shape) == tuple(sh.global_shape):
            continue
        full = torch.empty(tuple(meta.global_shape), dtype=sh.data.dtype, device="cpu")  # whole tensor, on the host
        # Every TP rank now reads the whole tensor: only the first vocab shard's main replica may
        # stay the main replica, or dist_checkpointing rejects the access pattern.
        frag = sh.global_offset[0] // max(sh.data.shape[0], 1)
        rid = sh.replica_id if isinstance(sh.replica_id, tuple) else (sh.replica_id,)
        sharded[k] = ShardedTensor.from_rank_offsets(sh.key, full, replica_id=(frag, *rid))
        fixups[k] = sh
    return fixups


def check_integrity(ckpt_dir: str | os.PathLike, *, collective: bool = True) -> None:
    """Verify a checkpoint against its manifest (CorruptCheckpointError naming the file); an older
    checkpoint without one is accepted with a warning (printed by rank 0)."""
    if not verify_checkpoint(ckpt_dir, collective=collective) and _rank() == 0:
        print(f"warning: {ckpt_dir} has no manifest.json (written before integrity checks): "
              f"its files are used unverified", flush=True)


def load_megatron_checkpoint(model: torch.nn.Module, ckpt_dir: str | os.PathLike, *,
                             vocab_size: Optional[int] = None, verify: bool = True) -> dict[str, Any]:
    """Collective: load a checkpoint dir (saved at any TP/PP) into this rank's model.

    ``verify``: check the files against the checkpoint's manifest first (False: the caller did).
    Returns the checkpoint's metadata.
    """
    from megatron.core import dist_checkpointing

    spec, meta = read_checkpoint_info(ckpt_dir)
    if verify:
        check_integrity(ckpt_dir)
    vocab = vocab_size or spec.vocab_size
    model_dir = str(Path(ckpt_dir) / MODEL_DIR)
    verify_dist_checkpoint(model_dir)  # megatron/torch read these pickles unrestricted
    sharded = model.sharded_state_dict()
    fixups = _vocab_fixups(sharded, model_dir)
    state = dist_checkpointing.load(sharded, model_dir)
    for k, sh in fixups.items():
        # Re-pad to this model's global vocab rows; take this rank's rows from the shard's own
        # offset (no global parallel state needed).
        full = state[k][:vocab]
        full = torch.cat([full, full.new_zeros(sh.global_shape[0] - vocab, *full.shape[1:])])
        start = sh.global_offset[0]
        state[k] = full[start:start + sh.data.shape[0]].clone()
    model.load_state_dict(state)
    return meta


def load_weights(model: torch.nn.Module, path: str, *, spec: ModelSpec, tp: int, tp_rank: int,
                 pp: int, pp_rank: int) -> None:
    """Fill this rank's model stage from an HF dir or a megatron checkpoint dir (collective for the latter)."""
    if is_hf_dir(path):
        from megatron_tip.models.hf.weights import load_hf_weights
        from megatron_tip.models.sharding import layer_offset

        load_hf_weights(model, path, spec=spec, tp=tp, tp_rank=tp_rank,
                        layer_offset=layer_offset(spec.num_layers, pp=pp, pp_rank=pp_rank))
    else:
        load_megatron_checkpoint(model, path, vocab_size=spec.vocab_size)
