"""Build a megatron-core GPTModel from a ``ModelSpec``.

Llama/Qwen-style decoders only: RMSNorm, SwiGLU MLP without biases, RoPE, optional qkv bias
(Qwen2.x), optional qk-layernorm (Qwen3), tied or untied embeddings. Local (torch) layer spec by
default; Transformer Engine's spec when TE is importable and CUDA is present.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from megatron_tip.models.spec import ModelSpec, check_model_parallel  # noqa: F401 (re-exported)


def _rope_args(spec: ModelSpec) -> dict:
    rs = spec.rope_scaling
    if not rs:
        return {}
    kind = rs.get("rope_type", rs.get("type"))
    if kind != "llama3":
        raise ValueError(f"rope_scaling type {kind!r} is not supported (only 'llama3')")
    # megatron-core's llama3 scaling hard-codes low=1, high=4, original context 8192.
    fixed = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    for k, v in fixed.items():
        if k in rs and float(rs[k]) != v:
            raise ValueError(f"rope_scaling.{k}={rs[k]} unsupported by megatron-core (needs {v})")
    return {"rope_scaling": True, "rope_scaling_factor": float(rs.get("factor", 8.0))}


def transformer_config(spec: ModelSpec, *, tp: int = 1, pp: int = 1,
                       params_dtype: torch.dtype = torch.float32, **overrides):
    """The megatron TransformerConfig equivalent of ``spec`` (no dropout, no fusions on CPU).

    ``overrides``: further TransformerConfig fields (e.g. recompute_granularity), as given.
    """
    from megatron.core.transformer import TransformerConfig

    on_gpu = torch.cuda.is_available()
    return TransformerConfig(
        num_layers=spec.num_layers,
        hidden_size=spec.hidden_size,
        num_attention_heads=spec.num_attention_heads,
        num_query_groups=spec.num_query_groups,
        kv_channels=spec.head_dim,
        ffn_hidden_size=spec.ffn_hidden_size,
        normalization="RMSNorm",
        layernorm_epsilon=spec.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=spec.add_qkv_bias,
        qk_layernorm=spec.qk_layernorm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        params_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        pipeline_dtype=params_dtype,
        use_cpu_initialization=not on_gpu,
        bias_dropout_fusion=on_gpu,
        apply_rope_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        init_method_std=0.02,
        **overrides,
    )


def te_available() -> bool:
    """Transformer Engine's layer spec can be used: CUDA and an importable transformer_engine."""
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


def resolved_impl(impl: str) -> str:
    """The layer spec ``impl`` (auto | local | transformer_engine) builds on this machine."""
    return "transformer_engine" if impl == "transformer_engine" or (impl == "auto" and te_available()) else "local"


def _layer_spec(spec: ModelSpec, impl: str = "auto"):
    if impl == "transformer_engine" and not te_available():
        raise ValueError("transformer_impl=transformer_engine needs CUDA and `pip install -e .[te]`")
    if impl == "transformer_engine" or (impl == "auto" and te_available()):
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=spec.qk_layernorm)
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    return get_gpt_layer_local_spec(qk_layernorm=spec.qk_layernorm, normalization="RMSNorm")


def build_gpt_model(
    spec: ModelSpec,
    *,
    tp: int = 1,
    pp: int = 1,
    pp_rank: int = 0,
    params_dtype: torch.dtype = torch.float32,
    max_sequence_length: Optional[int] = None,
    padded_vocab_size: Optional[int] = None,
    per_token_loss: bool = False,
    transformer_impl: str = "auto",
    config_overrides: Optional[dict] = None,
    pg_collection=None,
):
    """Build this rank's GPTModel stage (megatron parallel_state must be initialized).

    The output layer has ``spec.padded_vocab_size(tp)`` rows split over TP; rows at or past
    ``spec.vocab_size`` are padding (callers mask them, see ``megatron_tip.ops``).
    ``padded_vocab_size`` overrides the padding (teacher and student must shard alike).
    ``per_token_loss``: megatron's calculate_per_token_loss (loss funcs return sums + counts).
    ``transformer_impl``: auto | local | transformer_engine (see ``models.config.ModelConfig``).
    ``config_overrides``: TransformerConfig fields set as given (memory settings: recomputation).
    ``pg_collection``: megatron's ProcessGroupCollection for a model in a layout of its own
    (``megatron_tip.teacher.own_layout``); None = megatron's global parallel_state groups.
    """
    from megatron.core.models.gpt import GPTModel

    check_model_parallel(spec, tp=tp, pp=pp)
    config = transformer_config(spec, tp=tp, pp=pp, params_dtype=params_dtype, **(config_overrides or {}))
    config.calculate_per_token_loss = per_token_loss
    vocab = padded_vocab_size or spec.padded_vocab_size(tp)
    if vocab < spec.vocab_size or vocab % tp:
        raise ValueError(f"padded_vocab_size={vocab} must be >= vocab_size={spec.vocab_size} "
                         f"and divisible by tensor_parallel size {tp}")
    model = GPTModel(
        config=config,
        transformer_layer_spec=_layer_spec(spec, transformer_impl),
        vocab_size=vocab,
        max_sequence_length=max_sequence_length or spec.max_position_embeddings,
        pre_process=pp_rank == 0,
        post_process=pp_rank == pp - 1,
        parallel_output=True,
        share_embeddings_and_output_weights=spec.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=int(spec.rotary_base),
        pg_collection=pg_collection,
        **_rope_args(spec),
    )
    if torch.cuda.is_available():
        model = model.cuda()
    return model
