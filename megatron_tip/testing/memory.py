"""Peak live-tensor memory on any device, for benchmarks on CPU (no allocator stats there).

A TorchDispatchMode sees every tensor an op creates; each new storage is counted until Python
frees it (weakref finalizer). Views share their base's storage and are counted once. Storages
that were alive when the region began (weights, gradient buffers, optimizer state: found by
walking the garbage collector's tensors) are not counted, and neither are new views of them
(a ``weight.t()`` inside a linear layer is not new memory); their total is ``resident``.
"""
from __future__ import annotations

import gc
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


def live_storages() -> dict[int, "torch.UntypedStorage"]:
    """Distinct non-empty storages of every tensor the garbage collector can reach, by address."""
    gc.collect()
    out = {}
    for obj in gc.get_objects():
        if not issubclass(type(obj), torch.Tensor):  # type(), not isinstance: no __class__ lookups
            continue
        try:
            if not obj.is_meta:
                st = obj.untyped_storage()
                if st.nbytes():
                    out[st.data_ptr()] = st
        except (RuntimeError, ReferenceError):  # tensors without storage (e.g. functional wrappers)
            continue
    return out


class PeakMemory(TorchDispatchMode):
    """``with PeakMemory() as m: ...`` then ``m.peak`` (bytes), ``m.current`` and ``m.resident``.

    ``m.mark()`` returns the peak since the previous mark (or the start) and starts a new
    interval there, so one region can report per-phase peaks.
    """

    def __init__(self) -> None:
        super().__init__()
        self.current = 0
        self.peak = 0
        self.resident = 0
        self._interval_peak = 0
        self._seen: set[int] = set()
        self._watch: list[weakref.finalize] = []

    def __enter__(self):
        existing = live_storages()
        self.resident = sum(st.nbytes() for st in existing.values())
        for key, st in existing.items():  # not counted; forgotten when freed (the address may be reused)
            self._seen.add(key)
            self._watch.append(weakref.finalize(st, self._seen.discard, key))
        return super().__enter__()

    def __exit__(self, *exc):
        for f in self._watch:  # do not leave one finalizer per resident storage behind
            f.detach()
        self._watch.clear()
        return super().__exit__(*exc)

    def mark(self) -> int:
        """Peak bytes since the previous mark; the next interval starts at the current bytes."""
        got, self._interval_peak = self._interval_peak, self.current
        return got

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
                self._interval_peak = max(self._interval_peak, self.current)
                weakref.finalize(st, self._release, key, st.nbytes())
        return out
