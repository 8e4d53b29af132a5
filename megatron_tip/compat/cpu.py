"""megatron-core on a machine without CUDA: the few shims it needs, in one place.

megatron-core 0.16 assumes CUDA in a handful of spots that have nothing to do with the math.
``apply_cpu_shims()`` patches exactly those, once, and only when ``torch.cuda.is_available()``
is False; on a GPU box it does nothing. Each shim names the megatron call that needs it and
has a test in tests/integration/test_compat_cpu.py.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

_APPLIED = False
_MODE: "CudaToCpuMode | None" = None


# --- 1. RNG tracker ---------------------------------------------------------------------------
# model_parallel_cuda_manual_seed() -> CudaRNGStatesTracker.add() reads torch.cuda.get_rng_state(),
# and tracker.fork() (used by every TP layer init and dropout) swaps CUDA generator states. On CPU
# the "device" generator is the CPU default generator, so the tracker keeps CPU states instead.
def _cpu_get_rng_state(device: Any = "cuda", clone: bool = False, graph_safe: bool = False):
    state = torch.get_rng_state()
    return state.clone() if clone else state


def _cpu_set_rng_state(new_state: torch.Tensor, device: int = -1, graph_safe: bool = False):
    torch.set_rng_state(new_state)


def _make_cpu_tracker_cls():
    from megatron.core.tensor_parallel.random import CudaRNGStatesTracker

    class CpuRNGStatesTracker(CudaRNGStatesTracker):
        """CudaRNGStatesTracker whose named states are CPU generator states."""

        def add(self, name: str, seed: int) -> None:
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            self.seeds_.add(seed)
            orig = torch.get_rng_state()
            torch.manual_seed(seed)
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig)

    return CpuRNGStatesTracker


def _shim_rng_tracker() -> None:
    from megatron.core.tensor_parallel import random as mrandom

    mrandom._get_cuda_rng_state = _cpu_get_rng_state
    mrandom._set_cuda_rng_state = _cpu_set_rng_state
    mrandom._CUDA_RNG_STATE_TRACKER = _make_cpu_tracker_cls()()
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    # fork() warns when the CPU state moves inside a fork; on CPU that is the point of the fork.
    logging.getLogger(mrandom.__name__).setLevel(logging.ERROR)


# --- 2. torch.cuda device/stream calls ----------------------------------------------------------
# RoPE (rotary_pos_embedding.py), GlobalMemoryBuffer.get_tensor, p2p_communication, DDP's
# param_and_grad_buffer and dist_checkpointing call torch.cuda.current_device()/synchronize()/
# current_stream()/Stream(). Returning "cpu" as the current device makes every
# `device=torch.cuda.current_device()` allocation land on the CPU; streams become no-ops.
class _NullStream:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait_stream(self, *args: Any) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def record_event(self, *args: Any) -> None:
        return None


def _shim_cuda_device_calls() -> None:
    torch.cuda.current_device = lambda: "cpu"  # type: ignore[assignment]
    torch.cuda.synchronize = lambda *a, **k: None  # type: ignore[assignment]
    torch.cuda.current_stream = lambda *a, **k: _NullStream()  # type: ignore[assignment]
    torch.cuda.default_stream = lambda *a, **k: _NullStream()  # type: ignore[assignment]
    torch.cuda.Stream = _NullStream  # type: ignore[assignment,misc]
    torch.cuda.stream = lambda *a, **k: contextlib.nullcontext()  # type: ignore[assignment]
    torch.cuda.set_device = lambda *a, **k: None  # type: ignore[assignment]


# --- 3. literal device="cuda" -----------------------------------------------------------------
# pipeline_parallel/schedules.py (~60 sites), optimizer.py, clip_grads.py and dist_checkpointing
# create tensors with device="cuda" or call .cuda(). A TorchFunctionMode rewrites the device
# argument of every torch function call (factories, .to, .cuda) to CPU.
def _is_cuda_device(d: Any) -> bool:
    if isinstance(d, torch.device):
        return d.type == "cuda"
    if isinstance(d, str):
        return d.startswith("cuda")
    return isinstance(d, int) and not isinstance(d, bool)


class CudaToCpuMode(TorchFunctionMode):
    """Maps any CUDA device argument to CPU; ``Tensor.cuda()`` becomes a no-op."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs = {**kwargs, "device": "cpu"}
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


# --- 4. gradient clipping -----------------------------------------------------------------------
# optimizer.clip_grad_norm() -> clip_grad_by_total_norm_fp32 asserts
# param.grad.type() == 'torch.cuda.FloatTensor'. Same math without the CUDA type check.
def _clip_grad_by_total_norm_fp32_cpu(parameters, max_norm, total_norm, use_decoupled_grad=False):
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    grads = [getattr(p, attr) for p in parameters if getattr(p, attr, None) is not None]
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff < 1.0:
        for g in grads:
            g.detach().mul_(clip_coeff)


def _shim_grad_clipping() -> None:
    from megatron.core.optimizer import clip_grads, optimizer

    clip_grads.clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm_fp32_cpu
    optimizer.clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm_fp32_cpu


# --- 5. causal mask built during activation recomputation -----------------------------------------
# transformer/utils.get_default_causal_mask builds the mask with device="cuda". In a plain forward
# the device mode above rewrites it; when activation recomputation re-runs a layer inside
# CheckpointFunction.backward the mode is not on the stack, so the literal reaches CUDA. Same
# mask (cached per length), built on the CPU; fused_softmax imported the name, so patch both.
def _shim_causal_mask() -> None:
    import functools

    from megatron.core.fusions import fused_softmax
    from megatron.core.transformer import utils

    @functools.lru_cache(maxsize=32)
    def cpu_causal_mask(sq: int) -> torch.Tensor:
        return torch.triu(torch.ones(sq, sq, device="cpu"), diagonal=1).bool()

    utils.get_default_causal_mask = cpu_causal_mask
    fused_softmax.get_default_causal_mask = cpu_causal_mask


def apply_cpu_shims() -> bool:
    """Patch megatron-core for CPU execution; idempotent. Returns True when shims are active.

    Does nothing (returns False) when CUDA is available, so GPU runs use megatron unchanged.
    """
    global _APPLIED, _MODE
    if torch.cuda.is_available():
        return False
    if _APPLIED:
        return True
    _shim_rng_tracker()
    _shim_cuda_device_calls()
    _shim_grad_clipping()
    _shim_causal_mask()
    _MODE = CudaToCpuMode()
    _MODE.__enter__()  # process-wide for the rest of the run
    _APPLIED = True
    return True

