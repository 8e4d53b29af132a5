"""The on-disk formats, in one place: megatron checkpoint directories and run directories.

A megatron checkpoint directory (written by the converter and, per saved step, by the trainer):
```
<ckpt>/model_spec.json     ModelSpec.save
<ckpt>/model/              megatron dist_checkpointing of model.sharded_state_dict() (any TP/PP)
<ckpt>/hf/                 config.json, generation_config.json, tokenizer files of the HF source
<ckpt>/metadata.json       {"format", "tp", "pp", "params_dtype", "vocab_size", "source", ...}
<ckpt>/optim_rank*.pt      trainer checkpoints only: per-rank optimizer + LR-scheduler state
<ckpt>/trainer_state.json  trainer checkpoints only: the checkpoint is complete
<ckpt>/manifest.json       size + sha256 of every other file, written last (``checkpoint.manifest``)
```
A run directory (``run.out_dir``):
```
<run>/config.json          the resolved run config
<run>/metrics.jsonl        one line per step
<run>/tensorboard/         TensorBoard events
<run>/checkpoints/step_NNNNNN/   trainer checkpoints (above)
<run>/summary.json         final metrics and held-out accuracies
```
Writes are atomic: content goes to ``.<name>.tmp`` beside the target and is renamed into place.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Optional

from megatron_tip.models.spec import ModelSpec

FORMAT = "megatron_tip.checkpoint.v1"
SPEC_FILE, META_FILE, MODEL_DIR, HF_DIR = "model_spec.json", "metadata.json", "model", "hf"
TRAINER_STATE = "trainer_state.json"
CHECKPOINTS_DIR = "checkpoints"
HF_CONFIG = "config.json"
# Non-weight files of an HF checkpoint that an export should reproduce.
HF_AUX_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt",
    "added_tokens.json", "chat_template.jinja", "chat_template.json",
    "prompt_template.txt",  # megatron_tip.data.prompts: the prompt format a model was trained on
)


class CheckpointExistsError(FileExistsError):
    """The output directory already holds something and overwrite was not requested."""


def is_megatron_checkpoint(path: str | os.PathLike) -> bool:
    return (Path(path) / META_FILE).exists() and (Path(path) / SPEC_FILE).exists()


def is_hf_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / HF_CONFIG).is_file()


def read_json_object(path: str | os.PathLike) -> dict[str, Any]:
    """A JSON file holding an object; ValueError naming the file when it is not valid JSON or not an object."""
    p = Path(path)
    try:
        value = json.loads(p.read_bytes())
    except UnicodeDecodeError as e:
        raise ValueError(f"{p}: not UTF-8 text (byte {e.start}); restore the file or remove it") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{p}: not valid JSON (line {e.lineno} column {e.colno}: {e.msg}); "
                         f"restore the file or remove it") from None
    except RecursionError:
        raise ValueError(f"{p}: not valid JSON (nested too deeply)") from None
    if not isinstance(value, dict):
        raise ValueError(f"{p}: expected a JSON object ({{...}}), got {type(value).__name__}")
    return value


def read_spec(path: str | os.PathLike) -> ModelSpec:
    """ModelSpec of an HF dir (its config.json) or of a megatron checkpoint dir (model_spec.json).

    ValueError naming the file when it is not a JSON object.
    """
    from megatron_tip.models.hf.families import spec_from_hf_config

    p = Path(path)
    if is_hf_dir(p):
        return spec_from_hf_config(read_json_object(p / HF_CONFIG))
    if (p / SPEC_FILE).is_file():
        data = read_json_object(p / SPEC_FILE)
        try:
            return ModelSpec.from_dict(data)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{p / SPEC_FILE}: {e}") from None
    raise FileNotFoundError(f"{str(path)!r} is neither an HF checkpoint ({HF_CONFIG}) nor a megatron "
                            f"checkpoint ({SPEC_FILE})")


def read_checkpoint_info(ckpt_dir: str | os.PathLike) -> tuple[ModelSpec, dict[str, Any]]:
    """(ModelSpec, metadata dict) of a megatron checkpoint dir; FileNotFoundError when it is not one."""
    p = Path(ckpt_dir)
    if not is_megatron_checkpoint(p):
        raise FileNotFoundError(f"{str(p)!r} is not a megatron checkpoint ({SPEC_FILE} / {META_FILE} missing)")
    return read_spec(p), read_json_object(p / META_FILE)


def tokenizer_dir(path: str | os.PathLike) -> str:
    """Where a model dir keeps its tokenizer files (an HF dir itself, or a checkpoint's hf/)."""
    p = Path(path)
    return str(p / HF_DIR) if (p / SPEC_FILE).is_file() and (p / HF_DIR).is_dir() else str(p)


def check_output_dir(path: str | os.PathLike, *, overwrite: bool) -> None:
    """CheckpointExistsError when ``path`` exists non-empty and ``overwrite`` is False."""
    p = Path(path)
    if p.exists() and (not p.is_dir() or any(p.iterdir())) and not overwrite:
        what = "a checkpoint" if is_megatron_checkpoint(p) or is_hf_dir(p) else "files"
        raise CheckpointExistsError(f"output directory {str(p)!r} already holds {what}; "
                                    f"pass --overwrite to replace it")


def check_separate(source: str | os.PathLike, out: str | os.PathLike) -> None:
    """ValueError when ``out`` is ``source``, lies inside it or contains it (an overwrite would delete the source)."""
    src, dst = Path(source).resolve(), Path(out).resolve()
    if src == dst or src in dst.parents or dst in src.parents:
        raise ValueError(f"output {str(out)!r} overlaps the input {str(source)!r} (same directory, inside it, "
                         f"or containing it): choose an output directory outside the input")


def stale_temp_dirs(path: str | os.PathLike) -> list[Path]:
    """Leftover ``.<name>.tmp`` dirs beside ``path`` (from killed conversions or saves)."""
    parent = Path(path).absolute().parent
    return sorted(p for p in parent.glob(".*.tmp") if p.is_dir()) if parent.is_dir() else []


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


def copy_hf_aux_files(hf_dir: Optional[str | os.PathLike], dest: Path, *,
                      skip: tuple[str, ...] = ()) -> list[str]:
    """Copy config/tokenizer/generation files of ``hf_dir`` into ``dest``; returns copied names."""
    dest.mkdir(parents=True, exist_ok=True)
    if hf_dir is None:
        return []
    copied = []
    for name in HF_AUX_FILES:
        src = Path(hf_dir) / name
        if name not in skip and src.is_file():
            shutil.copy2(src, dest / name)
            copied.append(name)
    return copied


# ---- run directories ----------------------------------------------------------------------------
def checkpoints_root(out_dir: str | os.PathLike) -> Path:
    return Path(out_dir) / CHECKPOINTS_DIR


def step_dir(out_dir: str | os.PathLike, step: int) -> Path:
    return checkpoints_root(out_dir) / f"step_{step:06d}"


def optim_file(ckpt: str | os.PathLike, rank: int) -> Path:
    return Path(ckpt) / f"optim_rank{rank:05d}.pt"


def step_dirs(out_dir: str | os.PathLike) -> list[Path]:
    """Every step_* dir of a run, oldest first (complete or not)."""
    root = checkpoints_root(out_dir)
    return sorted(root.glob("step_*")) if root.is_dir() else []
