"""Peak live-tensor memory on any device, for benchmarks on CPU (no allocator stats there).

A TorchDispatchMode sees every tensor an op creates; each new storage is counted until Python
frees it (weakref finalizer). Views share their base's storage and are counted once. Tensors
that existed before the region (weights, optimizer state) are not counted.
"""
from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class PeakMemory(TorchDispatchMode):
    """``with PeakMemory() as m: ...`` then ``m.peak`` (bytes) and ``m.current``."""

    def __init__(self) -> None:
        super().__init__()
        self.current = 0
        self.peak = 0
        self._seen: set[int] = set()

    def _release(self, key: int, nbytes: int) -> None:
        self._seen.discard(key)
        self.current -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and not t.is_meta:
                st = t.untyped_storage()
                key = st.data_ptr()
                if key in self._seen or st.nbytes() == 0:
                    continue
                self._seen.add(key)
                self.current += st.nbytes()
                self.peak = max(self.peak, self.current)
                weakref.finalize(st, self._release, key, st.nbytes())
        return out
