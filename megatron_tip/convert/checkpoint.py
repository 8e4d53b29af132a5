"""The megatron checkpoint directory (written by the converter and by the trainer).

```
<dir>/model_spec.json   ModelSpec.save
<dir>/model/            megatron dist_checkpointing of model.sharded_state_dict() (any TP/PP)
<dir>/hf/               config.json, generation_config.json, tokenizer files of the HF source
<dir>/metadata.json     {"format", "tp", "pp", "params_dtype", "padded_vocab_size", "source", ...}
```
Writes are atomic: every rank writes into ``.<name>.tmp`` next to the target; after a barrier
rank 0 adds the small files and renames it into place, so a crash leaves no partial target.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from megatron_tip.models.spec import ModelSpec

FORMAT = "megatron_tip.checkpoint.v1"
SPEC_FILE, META_FILE, MODEL_DIR, HF_DIR = "model_spec.json", "metadata.json", "model", "hf"
# Non-weight files of an HF checkpoint that an export should reproduce.
HF_AUX_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt",
    "added_tokens.json", "chat_template.jinja", "chat_template.json",
    "prompt_template.txt",  # megatron_tip.eval.prompts: the prompt format a model was trained on
)


class CheckpointExistsError(FileExistsError):
    """The output directory already holds something and overwrite was not requested."""


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def is_megatron_checkpoint(path: str | os.PathLike) -> bool:
    return (Path(path) / META_FILE).exists() and (Path(path) / SPEC_FILE).exists()


def check_output_dir(path: str | os.PathLike, *, overwrite: bool) -> None:
    """CheckpointExistsError when ``path`` exists non-empty and ``overwrite`` is False."""
    p = Path(path)
    if p.exists() and (not p.is_dir() or any(p.iterdir())) and not overwrite:
        what = "a checkpoint" if is_megatron_checkpoint(p) or (p / "config.json").exists() else "files"
        raise CheckpointExistsError(f"output directory {str(p)!r} already holds {what}; "
                                    f"pass --overwrite to replace it")


def temp_dir_for(path: str | os.PathLike) -> Path:
    """Deterministic scratch dir beside ``path`` (same filesystem, so rename is atomic)."""
    p = Path(path).absolute()
    return p.parent / f".{p.name}.tmp"


def commit_dir(tmp: Path, target: str | os.PathLike) -> None:
    """Move ``tmp`` to ``target``, replacing an existing ``target`` (old copy removed last)."""
    target = Path(target).absolute()
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.old"
        if old.exists():
            shutil.rmtree(old)
        os.replace(target, old)
    os.replace(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def copy_hf_aux_files(hf_dir: Optional[str | os.PathLike], dest: Path) -> list[str]:
    """Copy config/tokenizer/generation files of ``hf_dir`` into ``dest``; returns copied names."""
    dest.mkdir(parents=True, exist_ok=True)
    if hf_dir is None:
        return []
    copied = []
    for name in HF_AUX_FILES:
        src = Path(hf_dir) / name
        if src.is_file():
            shutil.copy2(src, dest / name)
            copied.append(name)
    return copied


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
        dist_checkpointing.save(model.sharded_state_dict(), str(tmp / MODEL_DIR))
        _barrier()
        if _rank() == 0:
            spec.save(tmp / SPEC_FILE)
            copy_hf_aux_files(hf_dir, tmp / HF_DIR)
            dtype = next(model.parameters()).dtype
            meta = {"format": FORMAT, "tp": tp, "pp": pp, "params_dtype": str(dtype).removeprefix("torch."),
                    "vocab_size": spec.vocab_size, "source": source or (str(hf_dir) if hf_dir else None)}
            meta.update(extra_metadata or {})
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
            commit_dir(tmp, ckpt_dir)
    except BaseException:
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    _barrier()


def read_checkpoint_info(ckpt_dir: str | os.PathLike) -> tuple[ModelSpec, dict[str, Any]]:
    """(ModelSpec, metadata dict) of a checkpoint dir; FileNotFoundError when it is not one."""
    p = Path(ckpt_dir)
    if not is_megatron_checkpoint(p):
        raise FileNotFoundError(f"{str(p)!r} is not a megatron checkpoint ({SPEC_FILE} / {META_FILE} missing)")
    return ModelSpec.load(p / SPEC_FILE), json.loads((p / META_FILE).read_text())


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
        full = torch.empty(tuple(meta.global_shape), dtype=sh.data.dtype)
        # Every TP rank now reads the whole tensor: only the first vocab shard's main replica may
        # stay the main replica, or dist_checkpointing rejects the access pattern.
        frag = sh.global_offset[0] // max(sh.data.shape[0], 1)
        rid = sh.replica_id if isinstance(sh.replica_id, tuple) else (sh.replica_id,)
        sharded[k] = ShardedTensor.from_rank_offsets(sh.key, full, replica_id=(frag, *rid))
        fixups[k] = sh
    return fixups


def load_megatron_checkpoint(model: torch.nn.Module, ckpt_dir: str | os.PathLike, *,
                             vocab_size: Optional[int] = None) -> dict[str, Any]:
    """Collective: load a checkpoint dir (saved at any TP/PP) into this rank's model.

    Returns the checkpoint's metadata.
    """
    from megatron.core import dist_checkpointing

    spec, meta = read_checkpoint_info(ckpt_dir)
    vocab = vocab_size or spec.vocab_size
    model_dir = str(Path(ckpt_dir) / MODEL_DIR)
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
