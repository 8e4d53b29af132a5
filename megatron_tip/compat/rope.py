"""megatron-core's unfused RoPE without its copy of the rotated tensor (bitwise the same values).

``rope_utils._apply_rotary_pos_emb_bshd`` (megatron-core 0.16, the path without fused RoPE: the
local layer spec, on CPU and on GPUs without Transformer Engine) always ends with
``torch.cat((t, t_pass), -1)``. With RoPE over the whole head (every model we convert) ``t_pass``
is empty and the cat is a full copy of q and k, forward and backward: on the toy's training step
~5% of the student's forward + backward. ``apply_rope_without_empty_cat()`` wraps the function so
that case returns the rotated tensor itself, the same expression otherwise; every other case
(partial rotary, interleaved, multi-latent attention) calls megatron's own function.
tests/unit/test_compat_rope.py checks values and gradients are bitwise megatron's.
"""
from __future__ import annotations

import torch

_APPLIED = False


def apply_rope_without_empty_cat() -> None:
    """Patch ``megatron.core.models.common.embeddings.rope_utils`` once (idempotent)."""
    global _APPLIED
    if _APPLIED:
        return
    from megatron.core.models.common.embeddings import rope_utils

    original = rope_utils._apply_rotary_pos_emb_bshd

    def apply_bshd(t: torch.Tensor, freqs: torch.Tensor, rotary_interleaved: bool = False,
                   multi_latent_attention: bool = False, mscale: float = 1.0) -> torch.Tensor:
        if rotary_interleaved or multi_latent_attention or freqs.shape[-1] != t.shape[-1]:
            return original(t, freqs, rotary_interleaved, multi_latent_attention, mscale)
        # megatron's expression, term for term (so the same rounding), minus cat((t, empty))
        cos_ = (torch.cos(freqs) * mscale).to(t.dtype)
        sin_ = (torch.sin(freqs) * mscale).to(t.dtype)
        return (t * cos_) + (rope_utils._rotate_half(t, rotary_interleaved) * sin_)

    apply_bshd.megatron_original = original
    rope_utils._apply_rotary_pos_emb_bshd = apply_bshd
    _APPLIED = True
