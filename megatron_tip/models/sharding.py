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


def _full_bytes(param: torch.Tensor, *, tp: int) -> int:
    """Bytes of ``param``'s full (TP-gathered) tensor, known before any collective."""
    split = _tp_meta(param)[0] is not None and tp > 1
    return param.numel() * param.element_size() * (tp if split else 1)


def iter_canonical_buckets(
    model: torch.nn.Module,
    *,
    tp_group=None,
    layer_offset: int = 0,
    vocab_size: int,
    bucket_bytes: int,
) -> Iterator[dict[str, torch.Tensor]]:
    """Canonical tensors of this pipeline stage in buckets, one all-gather per bucket (collective).

    Each bucket holds full tensors of at most ``bucket_bytes`` (a tensor larger than that comes
    alone); its TP shards are packed into one flat buffer per rank, gathered once and cut back
    into full tensors, so no rank holds more than one bucket of gathered weights (two while a
    bucket is being cut from its gather buffer) when the consumer drops each bucket before
    asking for the next. Tensors that are not TP-split are
    the parameters themselves (detached, no copy): the consumer must not modify them. Every TP
    rank gets the same buckets, in parameter order.
    """
    tp = dist.get_world_size(tp_group) if tp_group is not None and dist.is_initialized() else 1
    tied = getattr(model, "share_embeddings_and_output_weights", False)
    pending: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, param in _param_items(model):
        if tied and name == "output_layer.weight":
            continue  # last-stage copy of the tied embedding (PP>1)
        nbytes = _full_bytes(param, tp=tp)
        if pending and (size + nbytes > bucket_bytes or param.dtype != pending[0][1].dtype):
            yield _gather_bucket(pending, tp=tp, tp_group=tp_group, layer_offset=layer_offset, vocab_size=vocab_size)
            pending, size = [], 0
        pending.append((name, param))
        size += nbytes
    if pending:
        yield _gather_bucket(pending, tp=tp, tp_group=tp_group, layer_offset=layer_offset, vocab_size=vocab_size)


def _gather_bucket(params: list[tuple[str, torch.Tensor]], *, tp: int, tp_group, layer_offset: int,
                   vocab_size: int) -> dict[str, torch.Tensor]:
    split = [(n, p) for n, p in params if tp > 1 and _tp_meta(p)[0] is not None]
    full: dict[str, torch.Tensor] = {}
    if split:
        flat = torch.cat([p.detach().reshape(-1) for _, p in split])
        shards = [torch.empty_like(flat) for _ in range(tp)]
        dist.all_gather(shards, flat, group=tp_group)
        del flat
        start = 0
        for name, p in split:
            n = p.numel()
            dim, stride = _tp_meta(p)
            full[name] = _join_from_ranks([s[start:start + n].view(p.shape) for s in shards], dim=dim, stride=stride)
            start += n
        del shards
    out = {}
    for name, p in params:
        value = full.pop(name) if name in full else p.detach()
        if name in _VOCAB_PARAMS or name.endswith("word_embeddings.weight"):
            value = value[:vocab_size]
        out[_global_name(name, layer_offset)] = value
    return out


def layer_offset(num_layers: int, *, pp: int, pp_rank: int) -> int:
    """First global layer index held by pipeline stage ``pp_rank`` (even split)."""
    return (num_layers // pp) * pp_rank
