"""Push the student's current weights into a rollout engine that holds its own copy (vLLM).

The engine may use another tensor parallelism than the student (``rollout.tensor_parallel``): it
receives full HF-named, HF-shaped tensors and each of its ranks keeps its own slice (vLLM's
loaders cut the slice). So the student's TP shards are gathered, but in buckets of at most
``bucket_bytes`` (one all-gather each, ``models.sharding.iter_canonical_buckets``), streamed to
the engine, and dropped before the next bucket is gathered: no rank ever holds a full copy of the
model beside its own shards.
"""
from __future__ import annotations

from typing import Any, Iterator

import torch

from megatron_tip.models.forward import unwrap
from megatron_tip.models.hf.mapping import canonical_to_hf
from megatron_tip.models.sharding import iter_canonical_buckets
from megatron_tip.models.spec import ModelSpec
from megatron_tip.rollout.base import RolloutEngine

# Gathered (full) bytes per all-gather: large enough that a layer's tensors share one collective,
# small next to a GPU's free memory (a 7B layer is ~0.4 GB in bf16).
BUCKET_BYTES = 512 * 2**20


def hf_weight_stream(model: torch.nn.Module, *, spec: ModelSpec, tp_group: Any,
                     bucket_bytes: int = BUCKET_BYTES) -> Iterator[tuple[str, torch.Tensor]]:
    """Lazy (HF name, full HF tensor) stream of ``model``'s weights, gathered bucket by bucket.

    Collective over ``tp_group``: every TP rank must consume the whole stream, in order. A bucket
    is released once the consumer has dropped its tensors and asks for the next one; tensors that
    are not TP-split are the parameters themselves (read-only views, no copy).
    """
    buckets = iter_canonical_buckets(unwrap(model), tp_group=tp_group, vocab_size=spec.vocab_size,
                                     bucket_bytes=bucket_bytes)
    for bucket in buckets:
        hf = list(canonical_to_hf(bucket, spec, partial=True))
        bucket.clear()  # the HF views keep what the engine still needs; nothing here holds the rest
        while hf:
            yield hf.pop(0)


def sync_weights(engine: RolloutEngine, model: torch.nn.Module, *, spec: ModelSpec, tp_group: Any,
                 bucket_bytes: int = BUCKET_BYTES) -> None:
    """Collective over ``tp_group``: stream the full HF weights into ``engine`` (``hf_weight_stream``).

    Engines that sample with the training model itself (``shares_training_weights``) need nothing.
    """
    if engine.shares_training_weights:
        return
    engine.sync_weights(hf_weight_stream(model, spec=spec, tp_group=tp_group, bucket_bytes=bucket_bytes))
