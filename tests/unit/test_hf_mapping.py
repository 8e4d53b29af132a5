"""Conversion pieces without megatron ranks: transforms, family choice, config and name maps."""
import json

import pytest
import torch

from tests.helpers.convert_cases import hf_config, make_hf_model
from megatron_tip.models.hf import (
    canonical_to_hf, fuse_gate_up, fuse_qkv, hf_config_from_spec, hf_to_canonical,
    spec_from_hf_config, split_gate_up, split_qkv,
)
from megatron_tip.models.hf.mapping import from_te_names, to_te_names

FAMILIES = ["qwen3", "llama", "qwen2"]


def _megatron_split(qkv_out: torch.Tensor, heads: int, groups: int, d: int):
    """What megatron's Attention.get_query_key_value_tensors does to the fused projection output
    [.., (heads + 2*groups)*d] at TP=1: view per group, split [q_g, k_g, v_g]."""
    x = qkv_out.view(*qkv_out.shape[:-1], groups, (heads // groups + 2) * d)
    q, k, v = torch.split(x, [heads // groups * d, d, d], dim=-1)
    return q.reshape(*q.shape[:-2], heads, d), k, v


@pytest.mark.parametrize("heads,groups,d", [(4, 2, 16), (8, 1, 8), (6, 6, 4)])
def test_fused_qkv_matches_megatron_attention_layout(heads, groups, d):
    hidden = 24
    q, k, v = (torch.randn(n * d, hidden) for n in (heads, groups, groups))
    bq, bk, bv = (torch.randn(n * d) for n in (heads, groups, groups))
    w = fuse_qkv(q, k, v, num_query_groups=groups, head_dim=d)
    b = fuse_qkv(bq, bk, bv, num_query_groups=groups, head_dim=d)
    x = torch.randn(3, hidden)
    mq, mk, mv = _megatron_split(x @ w.T + b, heads, groups, d)
    torch.testing.assert_close(mq, (x @ q.T + bq).view(3, heads, d), rtol=0, atol=1e-5)
    torch.testing.assert_close(mk, (x @ k.T + bk).view(3, groups, d), rtol=0, atol=1e-5)
    torch.testing.assert_close(mv, (x @ v.T + bv).view(3, groups, d), rtol=0, atol=1e-5)
    for fused, parts in ((w, (q, k, v)), (b, (bq, bk, bv))):
        back = split_qkv(fused, num_attention_heads=heads, num_query_groups=groups, head_dim=d)
        assert all(torch.equal(a, c) for a, c in zip(back, parts))


def test_gate_up_round_trip_and_swiglu_order():
    gate, up = torch.randn(10, 6), torch.randn(10, 6)
    fc1 = fuse_gate_up(gate, up)
    g2, u2 = split_gate_up(fc1)
    assert torch.equal(g2, gate) and torch.equal(u2, up)
    x = torch.randn(2, 6)
    a, b = (x @ fc1.T).chunk(2, dim=-1)  # megatron's glu: silu(first half) * second half
    torch.testing.assert_close(torch.nn.functional.silu(a) * b,
                               torch.nn.functional.silu(x @ gate.T) * (x @ up.T))


def test_te_names_are_aliases():
    n = "decoder.layers.7.input_layernorm.weight"
    assert to_te_names(n) == "decoder.layers.7.self_attention.linear_qkv.layer_norm_weight"
    assert from_te_names(to_te_names(n)) == n
    assert from_te_names("decoder.layers.3.mlp.linear_fc1.layer_norm_weight") == \
        "decoder.layers.3.pre_mlp_layernorm.weight"
    assert to_te_names("decoder.final_layernorm.weight") == "decoder.final_layernorm.weight"


@pytest.mark.parametrize("model_type,archs", [
    ("qwen2_moe", ["Qwen2MoeForCausalLM"]), ("qwen3_moe", None), ("mistral", ["MistralForCausalLM"]),
    ("qwen2", ["Qwen2VLForConditionalGeneration"]), ("llama", ["Qwen2ForCausalLM"]), ("Llama", None),
])
def test_family_chosen_exactly_never_by_substring(model_type, archs):
    cfg = hf_config("qwen2").to_dict()
    cfg["model_type"], cfg["architectures"] = model_type, archs
    with pytest.raises(ValueError, match="supported"):
        spec_from_hf_config(cfg)


@pytest.mark.parametrize("family", FAMILIES)
def test_config_round_trip(family):
    cfg = hf_config(family)
    spec = spec_from_hf_config(cfg)
    assert spec.family == family and spec.vocab_size == 200
    assert spec.qk_layernorm == (family == "qwen3") and spec.add_qkv_bias == (family == "qwen2")
    assert spec.tie_word_embeddings == (family == "qwen2")
    assert spec.head_dim == {"qwen3": 32, "llama": 16, "qwen2": 16}[family]
    if family == "llama":
        assert spec.rope_scaling["rope_type"] == "llama3" and spec.rotary_base == 500_000.0
    back = hf_config_from_spec(spec)
    skip = {"transformers_version", "_name_or_path"}
    a = {k: v for k, v in cfg.to_dict().items() if k not in skip}
    b = {k: v for k, v in back.to_dict().items() if k not in skip}
    assert a == b
    # model_spec.json round trip keeps everything too
    from megatron_tip.models import ModelSpec

    assert ModelSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


def test_unsupported_features_rejected():
    cfg = hf_config("llama").to_dict()
    cfg["attention_bias"] = True
    with pytest.raises(ValueError, match="attention_bias"):
        spec_from_hf_config(cfg)
    cfg = hf_config("qwen2").to_dict()
    cfg["use_sliding_window"] = True
    with pytest.raises(ValueError, match="sliding"):
        spec_from_hf_config(cfg)


@pytest.mark.parametrize("family", FAMILIES)
def test_hf_canonical_hf_is_bit_exact(family, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(make_hf_model(family, tmp_path / "hf"))
    spec = spec_from_hf_config(model.config)
    sd = {k: v for k, v in model.state_dict().items()
          if not (spec.tie_word_embeddings and k == "lm_head.weight")}
    canon = hf_to_canonical(iter(sd.items()), spec)  # streaming input
    assert ("output_layer.weight" in canon) != spec.tie_word_embeddings
    qkv = canon["decoder.layers.1.self_attention.linear_qkv.weight"]
    assert qkv.shape == ((spec.num_attention_heads + 2 * spec.num_query_groups) * spec.head_dim,
                         spec.hidden_size)
    back = dict(canonical_to_hf(canon, spec))
    assert back.keys() == sd.keys()
    stage = {k: v for k, v in canon.items() if k.startswith("decoder.layers.1.")}
    assert set(dict(canonical_to_hf(stage, spec, partial=True))) == {
        k for k in sd if k.startswith("model.layers.1.")}
    with pytest.raises(KeyError, match="embedding.word_embeddings.weight"):
        dict(canonical_to_hf(stage, spec))
    for k, v in sd.items():
        assert torch.equal(back[k], v), k


def test_hf_to_canonical_errors():
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(hf_config("qwen3"))
    spec = spec_from_hf_config(model.config)
    sd = dict(model.state_dict())
    bad = dict(sd)
    bad["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(3, 64)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.k_proj\.weight.*\(3, 64\).*\(64, 64\)"):
        hf_to_canonical(bad, spec)
    missing = dict(sd)
    del missing["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(KeyError, match="up_proj"):
        hf_to_canonical(missing, spec)
    extra = dict(sd, **{"model.layers.0.mlp.extra.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="no mapping"):
        hf_to_canonical(extra, spec)
    # vocab-padded embeddings (as gathered from a TP layout) are cut on export
    canon = hf_to_canonical(sd, spec)
    canon["embedding.word_embeddings.weight"] = torch.cat(
        [canon["embedding.word_embeddings.weight"], torch.zeros(56, 64)])
    out = dict(canonical_to_hf(canon, spec))
    assert torch.equal(out["model.embed_tokens.weight"], sd["model.embed_tokens.weight"])


@pytest.mark.parametrize("save_kwargs", [{}, {"max_shard_size": "40KB"}, {"safe_serialization": False}],
                         ids=["safetensors", "sharded", "bin"])
def test_reader_and_lazy_canonical(tmp_path, save_kwargs):
    from transformers import AutoModelForCausalLM

    from megatron_tip.models.hf.weights import HFCheckpointReader, LazyCanonical, check_hf_checkpoint

    d = make_hf_model("qwen3", tmp_path / "hf", **save_kwargs)
    sd = AutoModelForCausalLM.from_pretrained(d).state_dict()
    spec = spec_from_hf_config(json.loads((d / "config.json").read_text()))
    reader = HFCheckpointReader(d)
    check_hf_checkpoint(reader, spec)
    lazy, eager = LazyCanonical(reader, spec), hf_to_canonical(sd, spec)
    assert set(lazy) == set(eager)
    for k in eager:
        assert torch.equal(lazy[k], eager[k]), k
    # TE-spec names resolve to the same tensors
    assert torch.equal(lazy["decoder.layers.0.self_attention.linear_qkv.layer_norm_weight"],
                       eager["decoder.layers.0.input_layernorm.weight"])
