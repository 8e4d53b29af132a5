"""megatron-core on a machine without CUDA: the few shims it needs, in one place.

megatron-core 0.16 assumes CUDA in a handful of spots that have nothing to do with the math.
``apply_cpu_shims()`` patches exactly those, once, and only when ``torch.cuda.is_available()``
is False; on a GPU box it does nothing. Each shim names the megatron call that needs it and
has a test in tests/integration/test_compat_cpu.py.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import threading
from typing import Any, Callable, Iterator

import torch
from torch.overrides import TorchFunctionMode

_APPLIED = False


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
# pipeline_parallel/schedules.py, p2p_communication.py, the optimizers, clip_grads.py, grad_scaler.py,
# DDP's param_and_grad_buffer.py and dist_checkpointing create tensors with device="cuda" or call
# .cuda(). A TorchFunctionMode rewrites the device argument of every torch call (factories, .to,
# .cuda) to CPU. It costs a Python call per torch op (measured: ~66k calls, 0.6 s of a 1.3 s toy
# rollout when it was process-wide), so it is entered only while one of those modules' functions
# runs: their functions and methods are wrapped once, at start-up (``_CUDA_LITERAL_MODULES``).
# The model forward/backward (layers, attention, RoPE) only reads torch.cuda.current_device(),
# which shim 2 answers, and runs without the mode.
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


_DEPTH = threading.local()  # nesting depth of cuda_to_cpu() in this thread: enter the mode once


@contextlib.contextmanager
def cuda_to_cpu() -> Iterator[None]:
    """While active, CUDA device arguments of torch calls land on the CPU (re-entrant, per thread)."""
    depth = getattr(_DEPTH, "n", 0)
    _DEPTH.n = depth + 1
    try:
        if depth:
            yield
        else:
            with CudaToCpuMode():
                yield
    finally:
        _DEPTH.n = depth


# megatron-core modules whose own functions create tensors with a literal CUDA device (all their
# functions and methods are wrapped), and single functions of modules the forward path also uses.
_CUDA_LITERAL_MODULES = (
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.pipeline_parallel.p2p_communication",
    "megatron.core.optimizer",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.grad_scaler",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.dist_checkpointing.serialization",
    "megatron.core.dist_checkpointing.exchange_utils",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
    "megatron.core.rerun_state_machine",
    "megatron.core.tensor_parallel.data",
)
_CUDA_LITERAL_FUNCTIONS = (
    ("megatron.core.models.common.language_module.language_module", "LanguageModule",
     "setup_embeddings_and_output_layer"),  # PP>1 with tied embeddings: weight.data.cuda()
    ("megatron.core.utils", None, "local_multi_tensor_l2_norm"),
    ("megatron.core.utils", None, "check_param_hashes_across_dp_replicas"),
)


def _in_cpu_mode(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if getattr(_DEPTH, "n", 0):
            return fn(*args, **kwargs)
        with cuda_to_cpu():
            return fn(*args, **kwargs)

    wrapper.__wrapped_for_cpu__ = True  # type: ignore[attr-defined]
    return wrapper


def _shim_cuda_literals() -> None:
    """Wrap every function and method defined in ``_CUDA_LITERAL_MODULES`` so it runs under the mode.

    ``from x import f`` copies of a wrapped function in other loaded megatron modules are replaced
    too (e.g. ``dist_checkpointing.save`` re-exports ``serialization.save``).
    """
    import importlib
    import sys

    wrapped: dict[int, Callable] = {}
    for name in _CUDA_LITERAL_MODULES:
        mod = importlib.import_module(name)
        for attr, obj in list(vars(mod).items()):
            if getattr(obj, "__module__", None) != mod.__name__:
                continue
            if inspect.isfunction(obj) and not getattr(obj, "__wrapped_for_cpu__", False):
                wrapped[id(obj)] = _in_cpu_mode(obj)
                setattr(mod, attr, wrapped[id(obj)])
            elif inspect.isclass(obj):
                for meth, fn in list(vars(obj).items()):
                    if inspect.isfunction(fn) and (not meth.startswith("__") or meth == "__init__"):
                        setattr(obj, meth, _in_cpu_mode(fn))
    for name, cls, attr in _CUDA_LITERAL_FUNCTIONS:
        owner = importlib.import_module(name)
        owner = getattr(owner, cls) if cls else owner
        fn = vars(owner)[attr]
        if not getattr(fn, "__wrapped_for_cpu__", False):
            wrapped[id(fn)] = _in_cpu_mode(fn)
            setattr(owner, attr, wrapped[id(fn)])
    originals = {id(fn.__wrapped__): fn for fn in wrapped.values()}
    for mod in list(sys.modules.values()):
        if not getattr(mod, "__name__", "").startswith("megatron."):
            continue
        for attr, obj in list(vars(mod).items()):
            if inspect.isfunction(obj) and id(obj) in originals:
                setattr(mod, attr, originals[id(obj)])


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


# --- 5. causal mask ---------------------------------------------------------------------------------
# transformer/utils.get_default_causal_mask builds the mask with device="cuda" inside the forward
# (and inside CheckpointFunction.backward when activation recomputation re-runs a layer), where the
# device mode of shim 3 is not active. Same mask (cached per length), built on the CPU;
# fused_softmax imported the name, so patch both.
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
    global _APPLIED
    if torch.cuda.is_available():
        return False
    if _APPLIED:
        return True
    _shim_rng_tracker()
    _shim_cuda_device_calls()
    _shim_grad_clipping()
    _shim_causal_mask()
    _shim_cuda_literals()
    _APPLIED = True
    return True

