"""Lazy re-exports for package ``__init__`` files (PEP 562).

A package names its public API (``from megatron_tip.models import build_gpt_model`` keeps working)
without importing the modules that define it until a name is first used, so importing a
torch-free submodule such as ``megatron_tip.rollout.config`` does not import torch or megatron
through its package's ``__init__``.
"""
from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from typing import Any


def lazy_exports(package: str, exports: dict[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """(``__getattr__``, ``__dir__``) for ``package``; ``exports`` maps a public name to the submodule
    (relative to ``package``) that defines it. A name is imported on first use and then cached."""
    namespace = sys.modules[package].__dict__

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{module}"), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(exports))

    return __getattr__, __dir__
