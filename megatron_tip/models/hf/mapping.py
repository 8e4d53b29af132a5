"""Declarative HF <-> canonical megatron name map plus the two fusing transforms.

Canonical names are megatron-core's (local layer spec) with global layer numbers, full tensors,
true vocab (see ``megatron_tip.models.sharding``). Each ``Rule`` ties one canonical tensor to one
or more HF tensors; multi-tensor rules fuse with ``fuse_qkv`` (attention) or ``fuse_gate_up``
(SwiGLU fc1). Llama, Qwen2 and Qwen3 share HF parameter names; the spec's flags (qkv bias,
qk-layernorm, tied embeddings) switch optional rules on or off.

Megatron's fused QKV layout (``Attention.get_query_key_value_tensors``): rows are grouped per
query group g as [q heads of g (heads/groups * head_dim rows), k_g (head_dim), v_g (head_dim)].
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Mapping, Optional, Union

import torch

from megatron_tip.models.spec import ModelSpec


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, num_query_groups: int,
             head_dim: int) -> torch.Tensor:
    """[heads*d, ...], [groups*d, ...], [groups*d, ...] -> megatron [(heads + 2*groups)*d, ...]."""
    g, rest = num_query_groups, q.shape[1:]
    parts = (q.reshape(g, -1, *rest), k.reshape(g, head_dim, *rest), v.reshape(g, head_dim, *rest))
    return torch.cat(parts, dim=1).reshape(-1, *rest)


def split_qkv(qkv: torch.Tensor, *, num_attention_heads: int, num_query_groups: int,
              head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of ``fuse_qkv``: megatron [(heads + 2*groups)*d, ...] -> q, k, v (HF shapes)."""
    g, rest = num_query_groups, qkv.shape[1:]
    qd = num_attention_heads // g * head_dim
    grouped = qkv.reshape(g, qd + 2 * head_dim, *rest)
    q, k, v = torch.split(grouped, [qd, head_dim, head_dim], dim=1)
    return q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)


def fuse_gate_up(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """[ffn, H], [ffn, H] -> megatron fc1 [2*ffn, H] (gate rows first: SwiGLU = silu(x1) * x2)."""
    return torch.cat([gate, up], dim=0)


def split_gate_up(fc1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of ``fuse_gate_up``."""
    gate, up = fc1.chunk(2, dim=0)
    return gate, up


@dataclass(frozen=True)
class Rule:
    """One canonical tensor <-> HF tensor(s). ``{i}`` in a template is the global layer index."""

    megatron: str
    hf: tuple[str, ...]
    fuse: str = "none"  # "none" | "qkv" | "gate_up"
    when: Callable[[ModelSpec], bool] = lambda spec: True


_L, _HL = "decoder.layers.{i}.", "model.layers.{i}."
RULES: tuple[Rule, ...] = (
    Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",)),
    Rule(_L + "input_layernorm.weight", (_HL + "input_layernorm.weight",)),
    Rule(_L + "self_attention.linear_qkv.weight",
         tuple(_HL + f"self_attn.{p}_proj.weight" for p in "qkv"), fuse="qkv"),
    Rule(_L + "self_attention.linear_qkv.bias",
         tuple(_HL + f"self_attn.{p}_proj.bias" for p in "qkv"), fuse="qkv",
         when=lambda s: s.add_qkv_bias),
    Rule(_L + "self_attention.q_layernorm.weight", (_HL + "self_attn.q_norm.weight",),
         when=lambda s: s.qk_layernorm),
    Rule(_L + "self_attention.k_layernorm.weight", (_HL + "self_attn.k_norm.weight",),
         when=lambda s: s.qk_layernorm),
    Rule(_L + "self_attention.linear_proj.weight", (_HL + "self_attn.o_proj.weight",)),
    Rule(_L + "pre_mlp_layernorm.weight", (_HL + "post_attention_layernorm.weight",)),
    Rule(_L + "mlp.linear_fc1.weight", (_HL + "mlp.gate_proj.weight", _HL + "mlp.up_proj.weight"),
         fuse="gate_up"),
    Rule(_L + "mlp.linear_fc2.weight", (_HL + "mlp.down_proj.weight",)),
    Rule("decoder.final_layernorm.weight", ("model.norm.weight",)),
    Rule("output_layer.weight", ("lm_head.weight",), when=lambda s: not s.tie_word_embeddings),
)

# Transformer Engine's layer spec fuses the pre-attention / pre-MLP norms into the following
# linear; same tensors, other names. Canonical dicts from a TE model are normalized with these.
TE_ALIASES: dict[str, str] = {
    _L + "input_layernorm.weight": _L + "self_attention.linear_qkv.layer_norm_weight",
    _L + "pre_mlp_layernorm.weight": _L + "mlp.linear_fc1.layer_norm_weight",
}
# HF tensors that carry no weights (old checkpoints store RoPE buffers).
_IGNORED_HF = re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")


def _template_regex(template: str) -> re.Pattern:
    return re.compile("^" + re.escape(template).replace(r"\{i\}", r"(\d+)") + "$")


_TE_TO_LOCAL = [(_template_regex(te), local) for local, te in TE_ALIASES.items()]
_LOCAL_TO_TE = [(_template_regex(local), te) for local, te in TE_ALIASES.items()]


def _rename(name: str, table) -> str:
    for rx, target in table:
        m = rx.match(name)
        if m:
            return target.format(i=m.group(1))
    return name


def from_te_names(name: str) -> str:
    """Canonical (local-spec) name of a TE-spec parameter name; other names unchanged."""
    return _rename(name, _TE_TO_LOCAL)


def to_te_names(name: str) -> str:
    """TE-spec name of a canonical (local-spec) name; other names unchanged."""
    return _rename(name, _LOCAL_TO_TE)


def active_rules(spec: ModelSpec) -> list[Rule]:
    return [r for r in RULES if r.when(spec)]


def layer_names(spec: ModelSpec, layer: Optional[int] = None) -> Iterator[tuple[Rule, str, tuple[str, ...]]]:
    """(rule, canonical name, HF names) of the global tensors (layer None) or of one layer."""
    for r in active_rules(spec):
        per_layer = "{i}" in r.megatron
        if (layer is None) == per_layer:
            continue
        yield r, r.megatron.format(i=layer), tuple(h.format(i=layer) for h in r.hf)


def all_names(spec: ModelSpec) -> Iterator[tuple[Rule, str, tuple[str, ...]]]:
    """Every (rule, canonical name, HF names) of the model, in HF-like order."""
    glob = list(layer_names(spec))
    yield from (x for x in glob if x[0].megatron.startswith("embedding"))
    for i in range(spec.num_layers):
        yield from layer_names(spec, i)
    yield from (x for x in glob if not x[0].megatron.startswith("embedding"))


def expected_hf_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Shape of every HF tensor implied by the config (true vocab, HF layout)."""
    h, d, f, v = spec.hidden_size, spec.head_dim, spec.ffn_hidden_size, spec.vocab_size
    q, kv = spec.num_attention_heads * d, spec.num_query_groups * d
    by_suffix = {
        "embed_tokens.weight": (v, h), "lm_head.weight": (v, h), "norm.weight": (h,),
        "input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
        "q_proj.weight": (q, h), "k_proj.weight": (kv, h), "v_proj.weight": (kv, h),
        "q_proj.bias": (q,), "k_proj.bias": (kv,), "v_proj.bias": (kv,),
        "q_norm.weight": (d,), "k_norm.weight": (d,), "o_proj.weight": (h, q),
        "gate_proj.weight": (f, h), "up_proj.weight": (f, h), "down_proj.weight": (h, f),
    }
    out = {}
    for _, _, hf_names in all_names(spec):
        for n in hf_names:
            out[n] = by_suffix[".".join(n.split(".")[-2:])]
    return out


def fuse(rule: Rule, parts: list[torch.Tensor], spec: ModelSpec) -> torch.Tensor:
    """Canonical tensor of ``rule`` from its HF tensors (same order as ``rule.hf``)."""
    if rule.fuse == "qkv":
        return fuse_qkv(*parts, num_query_groups=spec.num_query_groups, head_dim=spec.head_dim)
    if rule.fuse == "gate_up":
        return fuse_gate_up(*parts)
    return parts[0]


def unfuse(rule: Rule, tensor: torch.Tensor, spec: ModelSpec) -> tuple[torch.Tensor, ...]:
    """HF tensors of ``rule`` from its canonical tensor."""
    if rule.fuse == "qkv":
        return split_qkv(tensor, num_attention_heads=spec.num_attention_heads,
                         num_query_groups=spec.num_query_groups, head_dim=spec.head_dim)
    if rule.fuse == "gate_up":
        return split_gate_up(tensor)
    return (tensor,)


def check_hf_shape(name: str, tensor_shape, spec: ModelSpec, expected: Optional[dict] = None) -> None:
    """ValueError naming the tensor and both shapes when the checkpoint disagrees with the config."""
    exp = (expected or expected_hf_shapes(spec)).get(name)
    if exp is not None and tuple(tensor_shape) != tuple(exp):
        raise ValueError(f"shape mismatch for {name}: checkpoint has {tuple(tensor_shape)}, "
                         f"config implies {tuple(exp)}")


HFTensors = Union[Mapping[str, torch.Tensor], Iterable[tuple[str, torch.Tensor]]]


def hf_to_canonical(hf_tensors: HFTensors, spec: ModelSpec, *, strict: bool = True) -> dict[str, torch.Tensor]:
    """Canonical state dict from HF tensors (a mapping or a stream of (name, tensor)).

    Fused tensors are built as soon as their parts arrived, so a stream holds at most one
    layer's pending parts beside the result. ``strict``: unknown HF names raise ValueError.
    Raises KeyError naming HF tensors that never arrived, ValueError on shape mismatch.
    """
    items = hf_tensors.items() if isinstance(hf_tensors, Mapping) else hf_tensors
    expected = expected_hf_shapes(spec)
    owner: dict[str, tuple[Rule, str, tuple[str, ...]]] = {}
    for rule, cname, hf_names in all_names(spec):
        for n in hf_names:
            owner[n] = (rule, cname, hf_names)
    pending: dict[str, dict[str, torch.Tensor]] = {}
    out: dict[str, torch.Tensor] = {}
    for name, tensor in items:
        if name not in owner:
            if _IGNORED_HF.match(name) or (name == "lm_head.weight" and spec.tie_word_embeddings):
                continue
            if strict:
                raise ValueError(f"HF tensor {name!r} has no mapping for family {spec.family!r}")
            continue
        check_hf_shape(name, tensor.shape, spec, expected)
        rule, cname, hf_names = owner[name]
        got = pending.setdefault(cname, {})
        got[name] = tensor
        if len(got) == len(hf_names):
            out[cname] = fuse(rule, [got[n] for n in hf_names], spec)
            del pending[cname]
    missing = [n for _, cname, names in all_names(spec) if cname not in out
               for n in names if n not in pending.get(cname, {})]
    if missing:
        raise KeyError(f"HF checkpoint lacks tensor(s): {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    return out


def canonical_to_hf(canonical: Mapping[str, torch.Tensor], spec: ModelSpec, *,
                    partial: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream (HF name, HF-shaped tensor) from a canonical dict; vocab is the true vocab.

    Accepts TE-spec names and vocab-padded embeddings (rows past ``spec.vocab_size`` are cut).
    Yielded tensors may be views of the inputs. KeyError names a missing canonical tensor unless
    ``partial`` (e.g. one pipeline stage's tensors: only those present are converted).
    """
    names = {from_te_names(k): k for k in canonical}
    for rule, cname, hf_names in all_names(spec):
        if cname not in names:
            if partial:
                continue
            raise KeyError(f"canonical state dict lacks {cname!r}")
        t = canonical[names[cname]]
        if cname in ("embedding.word_embeddings.weight", "output_layer.weight"):
            t = t[: spec.vocab_size]
        for n, part in zip(hf_names, unfuse(rule, t, spec)):
            yield n, part
