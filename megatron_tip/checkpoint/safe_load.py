"""Load checkpoint files from untrusted hands without running their code.

Pickle executes whatever a file asks for. Three places read pickles from a checkpoint:
- trainer optimizer state (``optim_rank*.pt``) and token-stat dumps: ``torch.load(weights_only=True)``
  (tensors and plain containers only);
- megatron ``dist_checkpointing`` directories: torch's ``.metadata`` is read with plain
  ``pickle.load`` and byte items inside ``*.distcp`` (``_extra_state``) with
  ``torch.load(weights_only=False)``. :func:`verify_dist_checkpoint` reads all of them first with
  a restricted unpickler that admits only the checkpoint-metadata classes (and
  ``weights_only=True`` for byte items and ``common.pt``); megatron loads the directory only if
  every file passes. Anything else is refused with one :class:`UnsafeCheckpointError` naming the
  file and the object it asked for.
"""
from __future__ import annotations

import dataclasses
import enum
import io
import os
import pickle
from pathlib import Path
from typing import Any

import torch

# Modules whose *classes* (dataclasses and enums only, never functions) may appear in .metadata.
_DCP_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.planner",
                "torch.distributed.checkpoint.filesystem")
_ALLOWED = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
            ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "slice")}


class UnsafeCheckpointError(ValueError):
    """A checkpoint file holds something other than tensors, plain data and checkpoint metadata."""


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        if module == "torch":
            obj = getattr(torch, name, None)
            if isinstance(obj, (torch.dtype, torch.layout, torch.memory_format)):
                return obj
        if module in _DCP_MODULES:
            obj = super().find_class(module, name)
            if isinstance(obj, type) and (dataclasses.is_dataclass(obj) or issubclass(obj, enum.Enum)):
                return obj
        raise pickle.UnpicklingError(f"{module}.{name} is not a checkpoint-metadata class")


def _refuse(path: str | os.PathLike, err: Exception) -> UnsafeCheckpointError:
    return UnsafeCheckpointError(f"refusing to load {path}: it holds objects other than tensors, plain data "
                                 f"and checkpoint metadata ({err}); only load checkpoints you trust")


def load_tensors(path: str | os.PathLike, *, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load`` restricted to tensors and plain containers (optimizer state, stat dumps)."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise _refuse(path, e) from None


def read_dcp_metadata(path: str | os.PathLike) -> Any:
    """torch.distributed.checkpoint ``.metadata`` through the restricted unpickler."""
    try:
        with open(path, "rb") as f:
            return _MetadataUnpickler(f).load()
    except (pickle.UnpicklingError, AttributeError, ImportError, EOFError, TypeError) as e:
        raise _refuse(path, e) from None


def verify_dist_checkpoint(model_dir: str | os.PathLike) -> None:
    """Check every pickled object of a dist_checkpointing directory before megatron reads it.

    Raises :class:`UnsafeCheckpointError` (or FileNotFoundError when ``.metadata`` is missing).
    """
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    d = Path(model_dir)
    if not (d / ".metadata").is_file():
        raise FileNotFoundError(f"{d} is not a dist_checkpointing directory (no .metadata)")
    meta = read_dcp_metadata(d / ".metadata")
    if (d / "common.pt").is_file():
        load_tensors(d / "common.pt")
    byte_keys = {k for k, v in getattr(meta, "state_dict_metadata", {}).items() if isinstance(v, BytesStorageMetadata)}
    for index, info in (getattr(meta, "storage_data", None) or {}).items():
        target = _storage_path(d, info.relative_path, getattr(index, "fqn", None))
        if getattr(index, "fqn", None) not in byte_keys:
            continue
        if getattr(info, "transform_descriptors", None):
            raise _refuse(target, ValueError("transformed byte items are not supported"))
        with open(target, "rb") as f:
            f.seek(int(info.offset))
            data = f.read(int(info.length))
        try:
            torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise _refuse(f"{target} (item {index.fqn})", e) from None


def _storage_path(d: Path, rel: Any, fqn: Any) -> Path:
    """Where torch's FileSystemReader reads an item (``d / rel``): refused unless ``rel`` names a
    file of ``d`` itself. Checked on the path as written, so files that are links (the HF hub
    cache layout: each file a link into ``../blobs``) load, while ``..`` or absolute paths do not."""
    name = str(rel)
    if not name or os.path.basename(name) != name or name in (".", "..") or os.sep in name or "/" in name:
        raise UnsafeCheckpointError(f"refusing to load {d}: .metadata stores item {fqn!r} at {name!r}, which is "
                                    f"not a file of the checkpoint directory (a storage path must be a plain "
                                    f"file name inside {d}); only load checkpoints you trust")
    return d / name
