"""One process per run directory: an exclusive ``flock`` on ``<run.out_dir>/run.lock``.

Rank 0 takes the lock before ``run.json`` is read and holds it for the life of the run. The kernel
releases a ``flock`` when the process holding it dies (kill -9 included), so a killed run never
leaves a stale lock; the file itself stays (removing a lock file races with the next taker). It
records who holds it, so a second process can name the holder. On a network file system the lock
is as good as its ``flock`` support (NFSv4 and Lustre with ``flock`` mounts honour it).
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Optional

LOCK_FILE = "run.lock"


class RunDirInUse(FileExistsError):
    """Another live process holds the run directory's lock (a user error: exit code 2)."""


class RunLock:
    """The held lock of one run directory; :meth:`release` (or process exit) gives it up."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path, self._fd = path, fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the last descriptor drops the flock
            self._fd = None


def lock_run_dir(out_dir: str | os.PathLike) -> RunLock:
    """Take ``out_dir``'s lock (creating the directory) or raise RunDirInUse naming the holder.

    The descriptor is not inherited by exec'd children (O_CLOEXEC); forked children share it,
    so the lock lasts until the trainer and anything it forked have exited.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(fd)
        os.close(fd)
        raise RunDirInUse(f"{out} is in use by another run ({holder}, lock {path}): wait for it to end or "
                          f"stop it; a second process would train the same steps into the same files") from None
    except BaseException:
        os.close(fd)
        raise
    record = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
    return RunLock(path, fd)


def _holder(fd: int) -> str:
    """'PID n on host h since t' from the lock file, as far as it can be read."""
    try:
        raw = os.pread(fd, 4096, 0).decode(errors="replace")
        rec: Optional[dict] = json.loads(raw) if raw.strip() else None
    except ValueError:
        rec = None
    if not isinstance(rec, dict):
        return "holder unknown"
    return f"PID {rec.get('pid')} on host {rec.get('host')} since {rec.get('since')}"
