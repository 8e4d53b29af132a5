"""Rollout engines behind one interface; ``build_engine`` is the one place that picks one.

Engines import their heavy dependencies lazily, so this package imports without vLLM; the
interface names (``rollout.base``) are imported on first use (PEP 562), so the torch-free
``rollout.config`` imports without torch.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

from megatron_tip.lazy_exports import lazy_exports
from megatron_tip.rollout.config import ENGINES, RolloutConfig

if TYPE_CHECKING:  # annotations only
    from megatron_tip.rollout.base import RolloutEngine

_EXPORTS = dict.fromkeys(("FIXED_SAMPLING", "Rollout", "RolloutEngine", "SamplingParams", "sampling_settings",
                          "stop_token_ids"), "base")
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = ["ENGINES", "RolloutConfig", "build_engine", "check_engine", *_EXPORTS]


def check_engine(cfg: RolloutConfig, *, ctx: Any) -> None:
    """What ``build_engine`` would refuse, checked before any model loads (ValueError naming the key).

    vllm: installed, PP=1 with TP groups of consecutive ranks, ``rollout.tensor_parallel`` dividing
    the student's TP, sleep mode only on CUDA.
    """
    if cfg.engine != "vllm":
        return
    import importlib.util

    from megatron_tip.rollout.colocated import check_layout
    from megatron_tip.rollout.vllm_engine import check_sleep_supported

    if importlib.util.find_spec("vllm") is None:
        raise ValueError("rollout.engine=vllm needs vLLM installed: `pip install -e .[vllm]` on GPU, "
                         "`pip install -r requirements/cpu-vllm.txt -e .` on CPU (README)")
    check_layout(ctx, engine_tp=cfg.tensor_parallel)
    check_sleep_supported(cfg.vllm_sleep_level)


def build_engine(cfg: RolloutConfig, *, model: Any, ctx: Any, vocab_size: int, pad_id: int,
                 hf_dir: str, dtype: str, max_model_len: int, seed: int,
                 micro_batch_size: Optional[int] = None) -> RolloutEngine:
    """The rollout engine ``cfg.engine`` for this rank.

    megatron: samples with the student ``model`` itself (any TP/PP), ``micro_batch_size`` rollouts per
    decode batch (None: all rollouts of a call at once). vllm: one colocated engine
    per rank started from the student's HF dir ``hf_dir`` (external launcher, PP=1) with
    ``cfg.tensor_parallel`` ranks per engine (0: the student's TP), sampling only ids below
    ``vocab_size``, sleeping between rollouts at ``cfg.vllm_sleep_level``, CUDA graphs unless
    ``cfg.vllm_enforce_eager`` (null: eager on CPU only), prefix caching on (the n samples of a
    prompt share its cached blocks).
    """
    if cfg.engine == "megatron":
        from megatron_tip.rollout.megatron_engine import MegatronEngine

        return MegatronEngine(model, ctx=ctx, vocab_size=vocab_size, pad_id=pad_id,
                              micro_batch_size=micro_batch_size)
    from megatron_tip.rollout.colocated import TPColocatedEngine
    from megatron_tip.rollout.vllm_engine import VLLMEngine

    eager = cfg.enforce_eager(cuda=ctx.device.type == "cuda")
    return TPColocatedEngine(lambda **parallel: VLLMEngine(
        hf_dir, dtype=dtype, gpu_memory_utilization=cfg.vllm_gpu_memory_utilization,
        max_model_len=max_model_len, seed=seed, vocab_size=vocab_size, sleep_level=cfg.vllm_sleep_level,
        enforce_eager=eager, enable_prefix_caching=True, **parallel), ctx=ctx, engine_tp=cfg.tensor_parallel)
