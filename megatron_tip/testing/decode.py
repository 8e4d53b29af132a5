"""Per-step decode logits of a megatron GPTModel two ways, for tests and the GPU script:
megatron-core's own static-KV-cache inference path (the reference) and ``rollout.kv_decoder``."""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


@torch.no_grad()
def decode_logits(model: torch.nn.Module, ids: torch.Tensor, *, prompt: int, lean: bool,
                  tp_group: Any | None = None, keep: dict[int, list[int]] | None = None) -> list[torch.Tensor]:
    """fp32 logits [b, V_padded] at the last new position of each step: a prefill of ``ids[:, :prompt]``,
    then one position at a time up to ``ids`` [b, T]'s end.

    ``lean=False``: ``GPTModel(..., inference_context=StaticInferenceContext)`` (it gathers the TP
    vocab shards itself); ``lean=True``: ``KVDecoder``, whose [b, V/TP] shards are all-gathered over
    ``tp_group`` (every rank of it takes part in every step's gather). ``keep`` (lean only): after
    step i, ``KVDecoder.keep(keep[i])`` (positions in the current batch); later logits are then
    those of the remaining rows only.
    """
    b, total = ids.shape
    spans = [(0, prompt)] + [(t, t + 1) for t in range(prompt, total)]
    if lean:
        from megatron_tip.rollout.kv_decoder import KVDecoder

        dec = KVDecoder(model, batch=b, max_len=total)
        out = []
        for i, (s0, s1) in enumerate(spans):
            got = dec.step(ids[:, s0:s1])
            if keep and i in keep:
                dec.keep(torch.tensor(keep[i], device=ids.device))
                ids = ids[keep[i]]
            if tp_group is not None and dist.get_world_size(tp_group) > 1:
                shards = [torch.empty_like(got) for _ in range(dist.get_world_size(tp_group))]
                dist.all_gather(shards, got, group=tp_group)
                got = torch.cat(shards, dim=-1)
            out.append(got)
        return out
    from megatron.core.inference.contexts import StaticInferenceContext

    cache = StaticInferenceContext(b, total)
    pos = torch.arange(total, device=ids.device).unsqueeze(0).expand(b, -1)
    out = []
    for s0, s1 in spans:
        if s0 > 0:
            cache.enable_decode_mode()
        out.append(model(ids[:, s0:s1], pos[:, s0:s1], None, inference_context=cache,
                         runtime_gather_output=True)[:, -1].float())
        cache.increment_sequence_len_offset(s1 - s0)
    return out
