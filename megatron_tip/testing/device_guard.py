"""Record tensor factory calls made from megatron_tip code without an explicit device.

On a GPU every tensor of the data path must live on the context's device; a ``torch.zeros(n)``
in package code silently lands on the CPU and the first collective or kernel that mixes it
with CUDA tensors fails. ``DeviceGuard`` (a TorchFunctionMode) sees every factory call; those
whose nearest caller outside torch is a file of the package (tests and test helpers excluded)
and that pass no ``device=`` are recorded with their file and line. ``torch.Generator`` is
patched the same way (a CPU generator cannot drive CUDA sampling). Calls derived from another
tensor (``*_like``, ``Tensor.new_*``, ``.to``) are fine and not factories here.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

import megatron_tip

PACKAGE = Path(megatron_tip.__file__).resolve().parent
EXEMPT = (PACKAGE / "testing", PACKAGE / "compat")
FACTORIES = {torch.tensor, torch.zeros, torch.ones, torch.empty, torch.full, torch.arange, torch.rand,
             torch.randn, torch.randint, torch.randperm, torch.linspace, torch.eye, torch.as_tensor,
             torch.scalar_tensor}
_TORCH = Path(torch.__file__).resolve().parent


def _package_caller(depth: int = 2) -> str | None:
    """'file:line' of the nearest caller outside torch and this module, if it is package code."""
    frame = sys._getframe(depth)
    while frame is not None:
        path = Path(frame.f_code.co_filename).resolve()
        if not (path.is_relative_to(_TORCH) or path == Path(__file__).resolve()):
            if path.is_relative_to(PACKAGE) and not any(path.is_relative_to(e) for e in EXEMPT):
                return f"{path.relative_to(PACKAGE.parent)}:{frame.f_lineno}"
            return None
        frame = frame.f_back
    return None


class DeviceGuard(TorchFunctionMode):
    """``with DeviceGuard() as g: ...`` then ``g.violations``: sorted 'file:line (factory)' strings."""

    def __init__(self) -> None:
        super().__init__()
        self.found: set[str] = set()
        self._generator = torch.Generator

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func in FACTORIES and kwargs.get("device") is None:
            where = _package_caller()
            if where:
                self.found.add(f"{where} ({func.__name__})")
        return func(*args, **kwargs)

    def __enter__(self) -> "DeviceGuard":
        real, guard = self._generator, self

        def generator(device: Any = None, *args: Any, **kwargs: Any) -> torch.Generator:
            if device is None:
                where = _package_caller()
                if where:
                    guard.found.add(f"{where} (Generator)")
            return real(device) if device is not None else real()

        torch.Generator = generator  # type: ignore[misc,assignment]
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        torch.Generator = self._generator  # type: ignore[misc]
        super().__exit__(*exc)

    @property
    def violations(self) -> list[str]:
        return sorted(self.found)
