"""Move weights between a layout-free "canonical" state dict and one rank's megatron shards.

Canonical form: megatron-core parameter names with *global* layer numbers, full (unsharded)
tensors, and the vocabulary dimension cut to the true vocab size (padding is a property of a
TP layout, not of the model). Conversion (HF <-> megatron), tests comparing layouts, and the
trainer's weight export to rollout engines all go through these two functions.

Megatron marks TP-split parameters with ``tensor_model_parallel``, ``partition_dim`` and
``partition_stride`` (stride 2 for the fused SwiGLU fc1: each rank holds [gate_r; up_r]).
"""
from __future__ import annotations

import re
from typing import Iterator, Optional

import torch
import torch.distributed as dist

_LAYER_RE = re.compile(r"^(decoder\.layers\.)(\d+)(\..*)$")
_VOCAB_PARAMS = ("embedding.word_embeddings.weight", "output_layer.weight")


def _global_name(name: str, layer_offset: int) -> str:
    m = _LAYER_RE.match(name)
    return f"{m.group(1)}{int(m.group(2)) + layer_offset}{m.group(3)}" if m else name


def _tp_meta(param: torch.Tensor) -> tuple[Optional[int], int]:
    if getattr(param, "tensor_model_parallel", False):
        return int(param.partition_dim), int(getattr(param, "partition_stride", 1))
    return None, 1


def _split_for_rank(full: torch.Tensor, *, dim: int, stride: int, tp: int, tp_rank: int) -> torch.Tensor:
    chunks = full.chunk(stride, dim=dim)
    return torch.cat([c.chunk(tp, dim=dim)[tp_rank] for c in chunks], dim=dim)


def _join_from_ranks(shards: list[torch.Tensor], *, dim: int, stride: int) -> torch.Tensor:
    per_rank = [s.chunk(stride, dim=dim) for s in shards]
    return torch.cat([torch.cat([pr[j] for pr in per_rank], dim=dim) for j in range(stride)], dim=dim)


def _param_items(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    # named_parameters() drops the tied output layer on single-stage models; that is intended:
    # the canonical dict stores a tied matrix once, as the embedding.
    yield from model.named_parameters()


def load_canonical_state_dict(
    model: torch.nn.Module,
    full: dict[str, torch.Tensor],
    *,
    tp: int = 1,
    tp_rank: int = 0,
    layer_offset: int = 0,
    vocab_size: int,
) -> None:
    """Copy this rank's shard of each canonical tensor into ``model`` (in place, no grad).

    ``full``: canonical tensors (see module doc). Vocab rows beyond ``vocab_size`` are zero.
    Raises KeyError naming the parameter when ``full`` lacks one, ValueError on shape mismatch.
    """
    with torch.no_grad():
        for name, param in _param_items(model):
            gname = _global_name(name, layer_offset)
            src = full.get(gname)
            if src is None and gname == "output_layer.weight":
                src = full.get("embedding.word_embeddings.weight")  # tied, last PP stage copy
            if src is None:
                raise KeyError(f"canonical state dict has no tensor for {gname!r}")
            dim, stride = _tp_meta(param)
            if name in _VOCAB_PARAMS or name.endswith("word_embeddings.weight"):
                if src.shape[0] != vocab_size:
                    raise ValueError(f"{gname}: {src.shape[0]} vocab rows, expected {vocab_size}")
                padded_rows = param.shape[0] * tp
                src = torch.cat([src, src.new_zeros(padded_rows - vocab_size, *src.shape[1:])])
            local = src if dim is None else _split_for_rank(src, dim=dim, stride=stride, tp=tp, tp_rank=tp_rank)
            if local.shape != param.shape:
                raise ValueError(f"{gname}: shard shape {tuple(local.shape)} != parameter "
                                 f"shape {tuple(param.shape)}")
            param.copy_(local.to(param.dtype))


def gather_canonical_state_dict(
    model: torch.nn.Module,
    *,
    tp_group=None,
    layer_offset: int = 0,
    vocab_size: int,
    tensors: Optional[dict[str, torch.Tensor]] = None,
) -> dict[str, torch.Tensor]:
    """Canonical tensors of this pipeline stage, gathered over the TP group (collective).

    ``tensors`` (same names as ``model.named_parameters()``) replaces parameter values, e.g.
    gradients, so the same gather serves weights and grads. Every TP rank returns the result.
    """
    tp = dist.get_world_size(tp_group) if tp_group is not None and dist.is_initialized() else 1
    out: dict[str, torch.Tensor] = {}
    tied = getattr(model, "share_embeddings_and_output_weights", False)
    for name, param in _param_items(model):
        if tied and name == "output_layer.weight":
            continue  # last-stage copy of the tied embedding (PP>1); megatron keeps them in sync
        value = (tensors[name] if tensors is not None else param).detach()
        dim, stride = _tp_meta(param)
        if dim is not None and tp > 1:
            shards = [torch.empty_like(value) for _ in range(tp)]
            dist.all_gather(shards, value.contiguous(), group=tp_group)
            value = _join_from_ranks(shards, dim=dim, stride=stride)
        if name in _VOCAB_PARAMS or name.endswith("word_embeddings.weight"):
            value = value[:vocab_size]
        out[_global_name(name, layer_offset)] = value.clone()
    return out


def layer_offset(num_layers: int, *, pp: int, pp_rank: int) -> int:
    """First global layer index held by pipeline stage ``pp_rank`` (even split)."""
    return (num_layers // pp) * pp_rank
