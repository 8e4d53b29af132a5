"""What a complete checkpoint holds: ``manifest.json``, every file's size and sha256.

Written as the last act of a save (a converter's by ``save_megatron_checkpoint`` before the
rename into place; a trainer checkpoint's extended by ``save_training_checkpoint`` after
``trainer_state.json``), verified before a checkpoint is resumed, loaded as a model path or
converted. A manifest that does not list ``trainer_state.json`` beside one marks a trainer save
interrupted before its last act (incomplete). A checkpoint without a manifest was written before
integrity checks existed: it is used with a warning, unverified.

Cost: sizes are checked for every file on every rank (a stat each); checksums are streamed in
8 MiB blocks, files spread over threads and, in a collective call, over ranks (each file is read
by one rank). sha256 uses the CPU's SHA extensions through OpenSSL (hashlib): measured with
``python tools/bench_manifest.py`` (README "Runs, preemption and safety").
"""
from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional

MANIFEST = "manifest.json"
FORMAT = "megatron_tip.manifest.v1"
_BLOCK = 8 << 20
_THREADS = max(1, min(8, os.cpu_count() or 1))


class CorruptCheckpointError(ValueError):
    """A checkpoint's files differ from its manifest, or cannot be read."""


def sha256_file(path: str | os.PathLike, *, block: int = _BLOCK) -> str:
    """sha256 hex digest of a file, streamed in ``block``-byte reads (hashlib releases the GIL)."""
    h = hashlib.sha256()
    buf = bytearray(block)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def list_files(ckpt_dir: str | os.PathLike) -> list[str]:
    """Relative POSIX paths of every file under ``ckpt_dir`` (links followed), the manifest excluded."""
    root = Path(ckpt_dir)
    out = []
    for dirpath, _, names in os.walk(root, followlinks=True):
        for name in names:
            rel = (Path(dirpath) / name).relative_to(root).as_posix()
            if rel != MANIFEST and not name.endswith(".tmp"):
                out.append(rel)
    return sorted(out)


def _rank_world(collective: bool) -> tuple[int, int]:
    import torch.distributed as dist

    if collective and dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_gather(obj: Any, world: int) -> list[Any]:
    if world == 1:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


def _hash_many(root: Path, rels: list[str]) -> dict[str, dict[str, Any]]:
    def one(rel: str) -> tuple[str, dict[str, Any]]:
        p = root / rel
        return rel, {"size": p.stat().st_size, "sha256": sha256_file(p)}

    with ThreadPoolExecutor(_THREADS) as pool:
        return dict(pool.map(one, rels))


def read_manifest(ckpt_dir: str | os.PathLike) -> Optional[dict[str, dict[str, Any]]]:
    """The manifest's ``{relative path: {"size", "sha256"}}``; None when there is none (an older
    checkpoint); CorruptCheckpointError naming the file when it is unreadable."""
    path = Path(ckpt_dir) / MANIFEST
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_bytes())
        files = data["files"]
        if not isinstance(files, dict) or not all(isinstance(v, dict) for v in files.values()):
            raise TypeError("'files' is not a mapping of file entries")
        return files
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CorruptCheckpointError(f"{path}: unreadable manifest ({type(e).__name__}: {e})") from None


def write_manifest(ckpt_dir: str | os.PathLike, *, extend: bool = False, collective: bool = False) -> None:
    """Hash every file of ``ckpt_dir`` into ``manifest.json`` (atomic write, on rank 0).

    ``extend``: keep the entries of the manifest already there (written by this save's model
    part seconds before) and hash only the files it lacks. ``collective``: every rank of the
    default group calls; files are split over ranks and the entries gathered.
    """
    root = Path(ckpt_dir)
    rank, world = _rank_world(collective)
    old = (read_manifest(root) or {}) if extend else {}
    todo = [rel for rel in list_files(root) if rel not in old]
    mine = _hash_many(root, todo[rank::world])
    entries = dict(old)
    for part in _all_gather(mine, world):
        entries.update(part)
    if rank == 0:
        tmp = root / f".{MANIFEST}.tmp"
        tmp.write_text(json.dumps({"format": FORMAT, "files": dict(sorted(entries.items()))}, indent=1))
        os.replace(tmp, root / MANIFEST)


def lists(ckpt_dir: str | os.PathLike, rel: str) -> bool:
    """True when the checkpoint's manifest lists ``rel``, or when it has no (readable) manifest."""
    try:
        files = read_manifest(ckpt_dir)
    except CorruptCheckpointError:
        return True  # verification names the problem
    return files is None or rel in files


def _inside(rel: str) -> bool:
    parts = Path(rel).parts
    return bool(parts) and not Path(rel).is_absolute() and ".." not in parts


def _check_file(root: Path, rel: str, entry: dict[str, Any], *, checksum: bool) -> Optional[str]:
    path = root / rel
    if not _inside(rel):
        return f"{root / MANIFEST}: lists {rel!r}, a path outside the checkpoint directory"
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return f"{path}: missing (the manifest lists it)"
    except OSError as e:
        return f"{path}: unreadable ({e.strerror or e})"
    if size != entry.get("size"):
        return f"{path}: {size} bytes, the manifest records {entry.get('size')} (truncated or replaced)"
    if checksum:
        try:
            digest = sha256_file(path)
        except OSError as e:
            return f"{path}: unreadable ({e.strerror or e})"
        if digest != entry.get("sha256"):
            return f"{path}: sha256 differs from the manifest (the file changed after the save)"
    return None


def verify_checkpoint(ckpt_dir: str | os.PathLike, *, collective: bool = False, checksums: bool = True) -> bool:
    """Check every file of a checkpoint against its manifest; False when it has none (older).

    Raises CorruptCheckpointError with one line naming the first bad file and why. Sizes are
    checked on every rank; checksums of each file on one rank (``collective``: all ranks of the
    default group call and all raise the same error).
    """
    root = Path(ckpt_dir)
    rank, world = _rank_world(collective)
    try:
        files = read_manifest(root)
        problem = None
    except CorruptCheckpointError as e:
        files, problem = {}, str(e)
    if files is None:
        return False
    rels = sorted(files)
    if problem is None:
        sizes = [p for rel in rels if (p := _check_file(root, rel, files[rel], checksum=False))]
        problem = sizes[0] if sizes else None
    if problem is None and checksums:
        share = rels[rank::world]
        with ThreadPoolExecutor(_THREADS) as pool:
            found = [p for p in pool.map(lambda rel: _check_file(root, rel, files[rel], checksum=True), share) if p]
        problem = found[0] if found else None
    problems = [p for p in _all_gather(problem, world) if p]
    if problems:
        raise CorruptCheckpointError(problems[0])
    return True
