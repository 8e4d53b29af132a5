"""Run the THD (packed sequences) path on the CPU, where Transformer Engine is absent.

Megatron's local ``DotProductAttention`` refuses ``packed_seq_params``. Everything else of the THD
path is megatron's own code on any device: ``PackedSeqParams`` through GPTModel, RoPE restarting
per sequence (``_apply_rotary_pos_emb_thd`` from ``cu_seqlens``), the [T, 1, H] activations and
p2p shapes. ``thd_on_local_spec`` stands in for TE's attention kernel only: for a THD call it runs
the local kernel (causal) on each ``cu_seqlens`` segment separately, which is what TE computes, and
lets the trainer's spec check accept ``train.packing=thd``. The GPU check (tests/gpu/checks.py)
compares the real TE kernel.
"""
from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator


@contextlib.contextmanager
def thd_on_local_spec() -> Iterator[None]:
    import torch
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    import megatron_tip.build as build_mod

    original = DotProductAttention.forward
    original_impl = build_mod.resolved_impl

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if packed_seq_params is None:
            return original(self, query, key, value, attention_mask, attn_mask_type=attn_mask_type,
                            attention_bias=attention_bias)
        assert packed_seq_params.qkv_format == "thd" and query.dim() == 3  # [T, heads, head_dim]
        cu = packed_seq_params.cu_seqlens_q.tolist()
        assert cu[-1] == query.shape[0], "cu_seqlens must cover the packed row exactly"
        outs = [original(self, query[a:b, None], key[a:b, None], value[a:b, None], None,
                         attn_mask_type=attn_mask_type) for a, b in itertools.pairwise(cu)]
        return torch.cat(outs)[:, 0]  # [T, heads x head_dim], TE's THD output layout

    DotProductAttention.forward = forward
    build_mod.resolved_impl = lambda impl: "transformer_engine"
    try:
        yield
    finally:
        DotProductAttention.forward = original
        build_mod.resolved_impl = original_impl
