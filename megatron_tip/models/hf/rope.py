"""RoPE settings of an HF config.json, in both layouts transformers has written.

- ``legacy`` (transformers 4.x, and the config.json of every Hub checkpoint): top-level
  ``rope_theta`` and ``rope_scaling`` (null, or ``{"rope_type": "llama3", "factor", ...}``).
- ``rope_parameters`` (transformers 5.x): one dict ``{"rope_theta", "rope_type", ...}``; the
  top-level keys are gone.

Values are read from the config dict itself (never from a ``PretrainedConfig`` attribute with a
default), checked against each other when both layouts are present, and any RoPE type other than
plain RoPE and Llama-3's ``llama3`` scaling is refused by name: a silently defaulted theta or a
dropped scaling builds a model that runs and is wrong.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

ROPE_TYPES = ("default", "llama3")
LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
_TYPE_KEYS = ("rope_type", "type")  # "type": the pre-4.45 spelling in older Llama configs


def _rope_type(d: Mapping[str, Any], where: str) -> str:
    kinds = {str(d[k]) for k in _TYPE_KEYS if d.get(k) is not None}
    if len(kinds) > 1:
        raise ValueError(f"config.json {where} names two RoPE types: {sorted(kinds)}")
    kind = kinds.pop() if kinds else "default"
    if kind not in ROPE_TYPES:
        raise ValueError(f"config.json {where}: RoPE type {kind!r} is not supported "
                         f"(supported: {', '.join(ROPE_TYPES)})")
    return kind


def _scaling(d: Mapping[str, Any], kind: str, where: str) -> Optional[dict[str, Any]]:
    """The normalized llama3 scaling dict (None for plain RoPE); unknown keys are refused."""
    known = set(_TYPE_KEYS) | {"rope_theta"} | (set(LLAMA3_KEYS) if kind == "llama3" else set())
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"config.json {where}: unsupported key(s) {unknown} for RoPE type {kind!r}")
    if kind == "default":
        return None
    missing = [k for k in LLAMA3_KEYS if d.get(k) is None]
    if missing:
        raise ValueError(f"config.json {where}: llama3 RoPE scaling needs {missing}")
    return {"rope_type": "llama3", **{k: d[k] for k in LLAMA3_KEYS}}


def read_rope(cfg: Mapping[str, Any]) -> tuple[float, Optional[dict[str, Any]], str]:
    """(theta, llama3 scaling dict or None, layout) of a config.json dict; ValueError when unsupported."""
    params, theta, scaling = cfg.get("rope_parameters"), cfg.get("rope_theta"), cfg.get("rope_scaling")
    if params is not None:
        if not isinstance(params, Mapping) or any(isinstance(v, Mapping) for v in params.values()):
            raise ValueError(f"config.json rope_parameters must be one dict of RoPE settings "
                             f"(per-layer-type RoPE is unsupported), got {params!r}")
        kind = _rope_type(params, "rope_parameters")
        found = _scaling(params, kind, "rope_parameters")
        if params.get("rope_theta") is None:
            raise ValueError("config.json rope_parameters has no rope_theta")
        if theta is not None and float(theta) != float(params["rope_theta"]):
            raise ValueError(f"config.json: rope_theta={theta} disagrees with "
                             f"rope_parameters.rope_theta={params['rope_theta']}")
        if scaling and _scaling(scaling, _rope_type(scaling, "rope_scaling"), "rope_scaling") != found:
            raise ValueError(f"config.json: rope_scaling={scaling} disagrees with rope_parameters={params}")
        return float(params["rope_theta"]), found, "rope_parameters"
    if theta is None:
        raise ValueError("config.json sets no RoPE theta (neither rope_theta nor rope_parameters.rope_theta)")
    if scaling is not None and not isinstance(scaling, Mapping):
        raise ValueError(f"config.json rope_scaling must be null or a dict, got {scaling!r}")
    found = _scaling(scaling, _rope_type(scaling, "rope_scaling"), "rope_scaling") if scaling else None
    return float(theta), found, "legacy"


def rope_config_keys(theta: float, scaling: Optional[Mapping[str, Any]], layout: str) -> dict[str, Any]:
    """The config.json keys that spell (theta, scaling) in ``layout`` (inverse of :func:`read_rope`)."""
    if layout == "rope_parameters":
        return {"rope_parameters": {"rope_theta": theta, **(dict(scaling) if scaling else {"rope_type": "default"})}}
    if layout == "legacy":
        return {"rope_theta": theta, **({"rope_scaling": dict(scaling)} if scaling else {})}
    raise ValueError(f"unknown RoPE layout {layout!r} (legacy | rope_parameters)")
