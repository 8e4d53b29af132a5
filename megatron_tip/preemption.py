"""Stop requests from the scheduler: SIGTERM, SIGUSR1, SIGHUP and SIGINT end a run cleanly.

Slurm (``--signal``), Kubernetes and torchrun preempt with SIGTERM (Slurm's advance warning is
often USR1); a user presses Ctrl-C (SIGINT) or loses the terminal or ssh session (SIGHUP). The
handler only records the signal; after each step all ranks agree on it (one MAX all-reduce) and the
run finishes that step, saves a checkpoint and exits with :data:`EXIT_PREEMPTED`, so a wrapper can
requeue and ``run.resume=auto`` continues. A second SIGINT stops at once. After SIGHUP a terminal
that was closed would fail every later write (EIO): its output goes to /dev/null instead (the run's
files keep everything).
"""
from __future__ import annotations

import os
import signal
import sys
from typing import Any, Optional

import torch
import torch.distributed as dist

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "temporary failure, try again" (requeue-friendly)
SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP, signal.SIGINT)


class StopRequest:
    """Records the first stop signal this process receives; :meth:`agreed` shares it across ranks."""

    def __init__(self, *, rank: int = 0) -> None:
        self.signum: Optional[int] = None
        self.rank = rank
        self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: stop now
        if self.signum is None:
            self.signum = signum
            if signum == signal.SIGHUP:
                _detach_from_terminal()
            print(f"rank {self.rank}: received {signal.Signals(signum).name}: finishing this step, then "
                  f"saving a checkpoint", file=sys.stderr, flush=True)

    def agreed(self, device: torch.device) -> Optional[int]:
        """Collective over the world: the signal any rank received (None if none did)."""
        flag = torch.tensor([float(self.signum or 0)], device=device)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item()) or None

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def _detach_from_terminal() -> None:
    """Point stdout/stderr at /dev/null where they are a terminal (one that hung up fails writes)."""
    null = os.open(os.devnull, os.O_WRONLY)
    for fd in (1, 2):
        if os.isatty(fd):
            os.dup2(null, fd)
    os.close(null)
