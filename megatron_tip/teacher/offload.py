"""``teacher.offload``: the teacher's weights live in host memory between scoring passes.

Only the scoring pass runs the teacher's layers, so its parameters move to (pinned) host memory
after each pass and back before the next; the output weight the gradient pass needs (its TP shard
in the student's layout) stays on the device. The parameters keep their identity and megatron's
attributes (only ``.data`` moves). On a CPU run the weights are already in host memory: a no-op.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch


class HostOffload:
    """Moves ``model``'s parameters (except ``keep``) between ``device`` and host memory."""

    def __init__(self, model: torch.nn.Module, *, device: torch.device, keep: tuple[torch.Tensor, ...] = ()) -> None:
        kept = {id(t) for t in keep}
        self.params = [p for p in model.parameters() if id(p) not in kept]
        self.device = device
        self.active = device.type != "cpu"
        self.on_host = False

    def to_host(self) -> None:
        """Parameters to (pinned) host memory; the device copies are freed."""
        if not self.active or self.on_host:
            return
        for p in self.params:
            host = torch.empty(p.shape, dtype=p.dtype, device="cpu", pin_memory=True)
            host.copy_(p.data)
            p.data = host
        self.on_host = True
        torch.cuda.empty_cache()  # give the freed blocks back to the rollout engine / the student

    def to_device(self) -> None:
        """Parameters back on ``device`` (copies from pinned memory on the current stream)."""
        if not self.active or not self.on_host:
            return
        for p in self.params:
            p.data = p.data.to(self.device, non_blocking=True)
        self.on_host = False

    @contextlib.contextmanager
    def on_device(self) -> Iterator[None]:
        """While active, the parameters are on the device; host memory again afterwards."""
        self.to_device()
        try:
            yield
        finally:
            self.to_host()
