"""A save that runs out of disk space, said in one line.

The writers report a full disk in different ways: Python writes raise ``OSError(ENOSPC)``,
torch's zip writer (``torch.save``) raises ``RuntimeError: ... unexpected pos N vs M`` with the
errno lost, dist_checkpointing's writer processes wrap it in a ``CheckpointException``. ``disk_full``
recognises all three (the last two by the free space left where the save was writing) and
``reports_disk_full`` turns them into :class:`DiskFullError`: which path, how much a checkpoint
of this run takes and how much was free, and the step of the last complete checkpoint.
"""
from __future__ import annotations

import errno
import functools
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar

F = TypeVar("F", bound=Callable[..., Any])
_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_TEXTS = ("No space left on device", "Disk quota exceeded")
# torch.save's messages when a write came up short; the errno is lost on the way.
_SHORT_WRITE_TEXTS = ("unexpected pos", "file write failed", "PytorchStreamWriter failed")


class DiskFullError(ValueError):
    """A checkpoint could not be written: the filesystem is full (or the quota reached)."""


def _chain(err: BaseException) -> list[BaseException]:
    """``err``, its causes, and the per-rank errors a CheckpointException carries."""
    seen: list[BaseException] = []
    todo = [err]
    while todo:
        e = todo.pop()
        if e is None or any(e is s for s in seen):
            continue
        seen.append(e)
        todo += [e.__cause__, e.__context__]
        failures = getattr(e, "failures", None)
        if isinstance(failures, dict):
            todo += [f[0] if isinstance(f, tuple) else f for f in failures.values()
                     if isinstance(f[0] if isinstance(f, tuple) else f, BaseException)]
    return seen


def _free_bytes(path: Path) -> Optional[int]:
    for p in (path, *path.parents):
        if p.exists():
            try:
                return shutil.disk_usage(p).free
            except OSError:
                return None
    return None


def _human(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} bytes"


def dir_size(path: str | os.PathLike) -> int:
    """Bytes of the files under ``path`` (0 when it does not exist)."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def disk_full(err: BaseException, *, where: str | os.PathLike, need: int = 0,
              margin: int = 16 << 20) -> Optional[str]:
    """The path a full disk stopped ``err`` at, or None when ``err`` is something else.

    ``where``: what the save was writing. A short write without an errno counts as a full disk
    when the filesystem has less than ``need`` (what a checkpoint takes) + ``margin`` bytes free:
    the failed save's partial files may already be deleted, so the space it ran out of is back.
    """
    for e in _chain(err):
        if isinstance(e, OSError) and e.errno in _FULL_ERRNOS:
            return str(e.filename or where)
    text = " ".join(str(e) for e in _chain(err))
    if any(t in text for t in _TEXTS):
        return str(where)
    free = _free_bytes(Path(where))
    if any(t in text for t in _SHORT_WRITE_TEXTS) and free is not None and free < need + margin:
        return str(where)
    return None


def disk_full_message(path: str, *, out_dir: str | os.PathLike, need: int, free: Optional[int],
                      last: Optional[tuple[Path, dict]]) -> str:
    """The one line for a save stopped by a full disk at ``path`` (``last``: newest complete checkpoint)."""
    what = f"the size of step {last[1]['step']}" if last else "the weights alone"
    have = f", {_human(free)} free there" if free is not None else ""
    after = (f"the last complete checkpoint is step {last[1]['step']} ({last[0]}), intact" if last
             else "no complete checkpoint was written yet")
    return (f"checkpoint save failed: No space left on device writing {path} (a checkpoint needs about "
            f"{_human(need)}, {what}{have}); {after}. Free space under {out_dir} and continue "
            f"with run.resume=auto")


def _model_bytes(model: Any) -> int:
    try:
        return sum(p.numel() * p.element_size() for p in model.parameters())
    except Exception:  # not a module: no estimate
        return 0


def reports_disk_full(save: F) -> F:
    """Decorate ``save(out_dir, step, ..., model=...)``: a full disk becomes one DiskFullError line,
    and the incomplete step directory it leaves is removed (rank 0) so the space comes back."""
    from megatron_tip.checkpoint.layout import step_dir

    @functools.wraps(save)
    def wrapper(out_dir: str, step: int, *args: Any, **kwargs: Any) -> Any:
        try:
            return save(out_dir, step, *args, **kwargs)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:  # dist_checkpointing's CheckpointException is a BaseException
            import torch.distributed as dist

            from megatron_tip.checkpoint.training import complete_checkpoints, read_trainer_state

            target = step_dir(out_dir, step)
            done = [c for c in complete_checkpoints(out_dir) if c[0] != target]
            last = done[-1] if done else None
            need = dir_size(last[0]) if last else _model_bytes(kwargs.get("model"))
            path = disk_full(e, where=target, need=need)
            if path is None:
                raise
            if (not dist.is_initialized() or dist.get_rank() == 0) and target.is_dir() \
                    and read_trainer_state(target) is None:
                shutil.rmtree(target, ignore_errors=True)
            raise DiskFullError(disk_full_message(path, out_dir=out_dir, need=need,
                                                  free=_free_bytes(target.parent), last=last)) from e
    return wrapper  # type: ignore[return-value]
