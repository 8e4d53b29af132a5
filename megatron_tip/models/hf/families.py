"""Supported model families and the HF config <-> ``ModelSpec`` mapping.

A family is chosen from the HF config's ``model_type`` / ``architectures`` by exact match (never
by substring: "qwen2_moe" or "Qwen2VLForConditionalGeneration" must not pass as "qwen2").
Everything of the HF config that the architecture does not need is kept verbatim in
``ModelSpec.extra_hf_config`` so an exported config.json reproduces the original.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from megatron_tip.models.spec import ModelSpec


@dataclass(frozen=True)
class Family:
    """What distinguishes one supported HF family from another."""

    model_type: str
    architecture: str
    qkv_bias: str  # "always" (Qwen2), "never", or "config" (config.attention_bias)
    qk_layernorm: bool
    has_head_dim: bool  # HF config carries an explicit head_dim


FAMILIES: dict[str, Family] = {
    "llama": Family("llama", "LlamaForCausalLM", qkv_bias="never", qk_layernorm=False, has_head_dim=True),
    "qwen2": Family("qwen2", "Qwen2ForCausalLM", qkv_bias="always", qk_layernorm=False, has_head_dim=False),
    "qwen3": Family("qwen3", "Qwen3ForCausalLM", qkv_bias="config", qk_layernorm=True, has_head_dim=True),
}
_BY_ARCH = {f.architecture: f for f in FAMILIES.values()}

# HF config keys that ModelSpec fields own; everything else goes to extra_hf_config.
_ARCH_KEYS = (
    "model_type", "num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads",
    "intermediate_size", "vocab_size", "head_dim", "max_position_embeddings", "rope_theta",
    "rope_scaling", "rms_norm_eps", "tie_word_embeddings", "attention_bias",
)
# Written by transformers itself; not part of the model.
_VOLATILE_KEYS = ("transformers_version", "_name_or_path")


def _supported() -> str:
    return (f"model_type in {sorted(FAMILIES)} / architectures in "
            f"{sorted(f.architecture for f in FAMILIES.values())}")


def family_for_hf_config(hf_config: Any) -> Family:
    """The Family of an HF config (object or dict); ValueError listing the supported ones."""
    cfg = hf_config if isinstance(hf_config, Mapping) else hf_config.to_dict()
    model_type = cfg.get("model_type")
    archs = list(cfg.get("architectures") or [])
    fam = FAMILIES.get(model_type)
    if fam is None:
        raise ValueError(f"unsupported model: model_type={model_type!r}, architectures={archs}; "
                         f"supported: {_supported()}")
    bad = [a for a in archs if _BY_ARCH.get(a) is not fam]
    if bad:
        raise ValueError(f"unsupported architecture {bad} for model_type={model_type!r}; "
                         f"supported: {_supported()}")
    return fam


def _reject_unsupported_features(fam: Family, cfg: Mapping[str, Any]) -> None:
    # Features megatron's local spec (as built by models.builder) cannot represent.
    if cfg.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act={cfg['hidden_act']!r} unsupported (only 'silu' / SwiGLU)")
    if cfg.get("mlp_bias"):
        raise ValueError("mlp_bias=True unsupported (megatron model has no MLP biases)")
    if fam.qkv_bias == "never" and cfg.get("attention_bias"):
        raise ValueError("attention_bias=True unsupported for llama (o_proj bias has no megatron slot)")
    if cfg.get("use_sliding_window"):
        raise ValueError("use_sliding_window=True unsupported (megatron model uses full attention)")
    if cfg.get("pretraining_tp", 1) not in (1, None):
        raise ValueError(f"pretraining_tp={cfg['pretraining_tp']} unsupported (needs 1)")


def spec_from_hf_config(hf_config: Any) -> ModelSpec:
    """ModelSpec of an HF ``PretrainedConfig`` (or its dict); ValueError when unsupported."""
    full = hf_config if isinstance(hf_config, Mapping) else hf_config.to_dict()
    fam = family_for_hf_config(full)
    _reject_unsupported_features(fam, full)
    if isinstance(hf_config, Mapping):
        diff = dict(hf_config)
    else:
        diff = hf_config.to_diff_dict()  # only non-default keys: keeps model_spec.json short
    heads = int(full["num_attention_heads"])
    head_dim = full.get("head_dim") if fam.has_head_dim else None
    qkv_bias = {"always": True, "never": False}.get(fam.qkv_bias, bool(full.get("attention_bias")))
    extra = {k: v for k, v in diff.items() if k not in _ARCH_KEYS and k not in _VOLATILE_KEYS}
    extra.setdefault("architectures", [fam.architecture])
    return ModelSpec(
        family=fam.model_type,
        num_layers=int(full["num_hidden_layers"]),
        hidden_size=int(full["hidden_size"]),
        num_attention_heads=heads,
        num_query_groups=int(full.get("num_key_value_heads") or heads),
        ffn_hidden_size=int(full["intermediate_size"]),
        vocab_size=int(full["vocab_size"]),
        kv_channels=int(head_dim) if head_dim else None,
        max_position_embeddings=int(full["max_position_embeddings"]),
        rotary_base=float(full.get("rope_theta", 10000.0)),
        rope_scaling=dict(full["rope_scaling"]) if full.get("rope_scaling") else None,
        norm_epsilon=float(full["rms_norm_eps"]),
        qk_layernorm=fam.qk_layernorm,
        add_qkv_bias=qkv_bias,
        tie_word_embeddings=bool(full.get("tie_word_embeddings", False)),
        extra_hf_config=extra,
    )


def hf_config_dict_from_spec(spec: ModelSpec) -> dict[str, Any]:
    """The HF config.json content (as a dict) that ``spec`` came from."""
    fam = FAMILIES.get(spec.family)
    if fam is None:
        raise ValueError(f"unsupported family {spec.family!r}; supported: {sorted(FAMILIES)}")
    d: dict[str, Any] = dict(spec.extra_hf_config)
    d.update(
        model_type=fam.model_type,
        num_hidden_layers=spec.num_layers,
        hidden_size=spec.hidden_size,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_query_groups,
        intermediate_size=spec.ffn_hidden_size,
        vocab_size=spec.vocab_size,
        max_position_embeddings=spec.max_position_embeddings,
        rope_theta=spec.rotary_base,
        rope_scaling=dict(spec.rope_scaling) if spec.rope_scaling else None,
        rms_norm_eps=spec.norm_epsilon,
        tie_word_embeddings=spec.tie_word_embeddings,
    )
    if fam.has_head_dim:
        d["head_dim"] = spec.head_dim
    elif spec.head_dim != spec.hidden_size // spec.num_attention_heads:
        raise ValueError(f"{spec.family} cannot express head_dim={spec.head_dim} != hidden/heads")
    if fam.qkv_bias == "config":
        d["attention_bias"] = spec.add_qkv_bias
    elif spec.add_qkv_bias != (fam.qkv_bias == "always"):
        raise ValueError(f"{spec.family} requires add_qkv_bias={fam.qkv_bias == 'always'}")
    if spec.qk_layernorm != fam.qk_layernorm:
        raise ValueError(f"{spec.family} requires qk_layernorm={fam.qk_layernorm}")
    d.setdefault("architectures", [fam.architecture])
    return d


def hf_config_from_spec(spec: ModelSpec):
    """A ``transformers.PretrainedConfig`` of the family's class equivalent to ``spec``."""
    from transformers import AutoConfig

    d = hf_config_dict_from_spec(spec)
    model_type = d.pop("model_type")
    return AutoConfig.for_model(model_type, **d)
