"""Push the student's current weights into a rollout engine that holds its own copy (vLLM)."""
from __future__ import annotations

from typing import Any

import torch

from megatron_tip.models.forward import unwrap
from megatron_tip.models.hf.mapping import canonical_to_hf
from megatron_tip.models.sharding import gather_canonical_state_dict
from megatron_tip.models.spec import ModelSpec
from megatron_tip.rollout.base import RolloutEngine


def sync_weights(engine: RolloutEngine, model: torch.nn.Module, *, spec: ModelSpec, tp_group: Any) -> None:
    """Collective over ``tp_group``: gather full canonical tensors, convert to HF names/shapes, load.

    Engines that sample with the training model itself (``shares_training_weights``) need nothing.
    """
    if engine.shares_training_weights:
        return
    canonical = gather_canonical_state_dict(unwrap(model), tp_group=tp_group, vocab_size=spec.vocab_size)
    engine.sync_weights(canonical_to_hf(canonical, spec))
