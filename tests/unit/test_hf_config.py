"""HF config.json -> ModelSpec for Qwen3, Llama-3.x and Qwen2.5, in both transformers layouts.

The fixtures are the config.json files of real checkpoints (values as published; no weights),
written as transformers 4.x and the Hub write them (``rope_theta`` + ``rope_scaling``) and as
transformers 5.x writes them (``rope_parameters``). Every RoPE theta is non-default and two
configs carry Llama-3 scaling, so a reader that falls back to defaults fails here. The independent
reference is the installed transformers: its rotary embedding's inverse frequencies for the same
file must equal megatron-core's built from our spec. Runs under transformers 4 and 5 (CI: both).
"""
import copy
import json

import pytest
import torch
import transformers

from megatron_tip.checkpoint import read_spec
from megatron_tip.models.builder import _rope_args
from megatron_tip.models.hf import hf_config_dict_from_spec, spec_from_hf_config
from megatron_tip.models.hf.families import save_hf_config

TF_MAJOR = int(transformers.__version__.split(".")[0])
LLAMA3 = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192, "rope_type": "llama3"}
CONFIGS = {  # legacy layout, as on the Hub
    "Qwen3-4B": {
        "architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": 151643, "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu",
        "hidden_size": 2560, "initializer_range": 0.02, "intermediate_size": 9728,
        "max_position_embeddings": 40960, "max_window_layers": 36, "model_type": "qwen3",
        "num_attention_heads": 32, "num_hidden_layers": 36, "num_key_value_heads": 8, "rms_norm_eps": 1e-06,
        "rope_scaling": None, "rope_theta": 1000000, "sliding_window": None, "tie_word_embeddings": True,
        "torch_dtype": "bfloat16", "transformers_version": "4.51.0", "use_cache": True,
        "use_sliding_window": False, "vocab_size": 151936},
    "Llama-3.1-8B-Instruct": {
        "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "hidden_act": "silu",
        "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336,
        "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "llama", "num_attention_heads": 32,
        "num_hidden_layers": 32, "num_key_value_heads": 8, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
        "rope_scaling": dict(LLAMA3), "rope_theta": 500000.0, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16", "transformers_version": "4.43.0.dev0", "use_cache": True, "vocab_size": 128256},
    "Llama-3.2-1B-Instruct": {
        "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "head_dim": 64, "hidden_act": "silu",
        "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 8192,
        "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "llama", "num_attention_heads": 32,
        "num_hidden_layers": 16, "num_key_value_heads": 8, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
        "rope_scaling": dict(LLAMA3, factor=32.0), "rope_theta": 500000.0, "tie_word_embeddings": True,
        "torch_dtype": "bfloat16", "transformers_version": "4.45.0.dev0", "use_cache": True, "vocab_size": 128256},
    "Qwen2.5-1.5B-Instruct": {  # no rope_scaling key at all
        "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
        "eos_token_id": 151645, "hidden_act": "silu", "hidden_size": 1536, "initializer_range": 0.02,
        "intermediate_size": 8960, "max_position_embeddings": 32768, "max_window_layers": 21,
        "model_type": "qwen2", "num_attention_heads": 12, "num_hidden_layers": 28, "num_key_value_heads": 2,
        "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": True,
        "torch_dtype": "bfloat16", "transformers_version": "4.43.1", "use_cache": True,
        "use_sliding_window": False, "vocab_size": 151936},
}
# What the spec must hold, read off the files above by hand.
EXPECTED = {
    "Qwen3-4B": dict(family="qwen3", head_dim=128, rotary_base=1e6, factor=None, tie=True, qk_norm=True, bias=False),
    "Llama-3.1-8B-Instruct": dict(family="llama", head_dim=128, rotary_base=5e5, factor=8.0, tie=False,
                                  qk_norm=False, bias=False),
    "Llama-3.2-1B-Instruct": dict(family="llama", head_dim=64, rotary_base=5e5, factor=32.0, tie=True,
                                  qk_norm=False, bias=False),
    "Qwen2.5-1.5B-Instruct": dict(family="qwen2", head_dim=128, rotary_base=1e6, factor=None, tie=True,
                                  qk_norm=False, bias=True),
}


def as_rope_parameters(cfg: dict) -> dict:
    """The same config as transformers 5 writes it: one rope_parameters dict, dtype renamed."""
    out = {k: v for k, v in cfg.items() if k not in ("rope_theta", "rope_scaling", "torch_dtype")}
    out["rope_parameters"] = {"rope_theta": cfg["rope_theta"], **(cfg.get("rope_scaling") or {"rope_type": "default"})}
    out["dtype"], out["transformers_version"] = cfg["torch_dtype"], "5.19.0"
    return out


LAYOUTS = {"legacy": lambda c: copy.deepcopy(c), "rope_parameters": as_rope_parameters}
CASES = [pytest.param(name, layout, id=f"{name}-{layout}") for name in CONFIGS for layout in LAYOUTS]


def _config(name: str, layout: str) -> dict:
    return LAYOUTS[layout](CONFIGS[name])


def _without_version(d: dict) -> dict:
    return {k: v for k, v in d.items() if k != "transformers_version"}


@pytest.mark.parametrize("name,layout", CASES)
def test_spec_holds_the_values_written_in_config_json(name, layout):
    spec = spec_from_hf_config(_config(name, layout))
    want = EXPECTED[name]
    assert (spec.family, spec.head_dim, spec.rotary_base) == (want["family"], want["head_dim"], want["rotary_base"])
    assert (spec.rope_scaling or {}).get("factor") == want["factor"]
    if want["factor"]:
        assert spec.rope_scaling == dict(LLAMA3, factor=want["factor"])
    assert spec.tie_word_embeddings == want["tie"]
    assert (spec.qk_layernorm, spec.add_qkv_bias) == (want["qk_norm"], want["bias"])
    assert spec.hf_rope_layout == layout


@pytest.mark.parametrize("name,layout", CASES)
def test_export_writes_config_json_back_unchanged(name, layout, tmp_path):
    cfg = _config(name, layout)
    spec = spec_from_hf_config(cfg)
    assert hf_config_dict_from_spec(spec) == _without_version(cfg)
    save_hf_config(spec, tmp_path)
    assert _without_version(json.loads((tmp_path / "config.json").read_text())) == _without_version(cfg)
    assert read_spec(tmp_path) == spec


def _hf_inv_freq(cfg: dict) -> torch.Tensor:
    """transformers' own reading of the file: its rotary embedding's inverse frequencies."""
    from transformers import AutoConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding

    d = dict(cfg)
    hf_cfg = AutoConfig.for_model(d.pop("model_type"), **d)
    cls = {"llama": LlamaRotaryEmbedding, "qwen2": Qwen2RotaryEmbedding, "qwen3": Qwen3RotaryEmbedding}
    return cls[cfg["model_type"]](hf_cfg).inv_freq


def _megatron_inv_freq(spec) -> torch.Tensor:
    """megatron-core's rotary embedding built with the arguments models.builder gives GPTModel."""
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    return RotaryEmbedding(spec.head_dim, 1.0, rotary_base=int(spec.rotary_base), use_cpu_initialization=True,
                           **_rope_args(spec)).inv_freq


# transformers 4 does not know the rope_parameters layout (it would read theta 10000): only the
# legacy files are a reference there.
READABLE = [c for c in CASES if TF_MAJOR >= 5 or c.values[1] == "legacy"]


@pytest.mark.parametrize("name,layout", READABLE)
def test_rotary_frequencies_match_transformers(name, layout):
    cfg = _config(name, layout)
    ours, ref = _megatron_inv_freq(spec_from_hf_config(cfg)), _hf_inv_freq(cfg)
    torch.testing.assert_close(ours, ref.to(ours.dtype), rtol=1e-6, atol=0)
    plain = _megatron_inv_freq(spec_from_hf_config(dict(cfg, rope_theta=10000.0, rope_scaling=None,
                                                        rope_parameters=None)))
    assert (plain - ref).abs().max() > 1e-3  # a defaulted theta / dropped scaling would be caught


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("kind", ["yarn", "linear", "dynamic", "longrope", "mrope"])
def test_unknown_rope_type_refused_by_name(kind, layout):
    cfg = CONFIGS["Llama-3.1-8B-Instruct"]
    bad = dict(cfg, rope_scaling={"rope_type": kind, "factor": 4.0})
    with pytest.raises(ValueError, match=f"'{kind}'"):
        spec_from_hf_config(LAYOUTS[layout](bad))
    old_spelling = dict(cfg, rope_scaling={"type": kind, "factor": 4.0})  # pre-4.45 key
    with pytest.raises(ValueError, match=f"'{kind}'"):
        spec_from_hf_config(LAYOUTS[layout](old_spelling))


def test_inconsistent_or_incomplete_rope_refused():
    base = CONFIGS["Llama-3.1-8B-Instruct"]
    five = as_rope_parameters(base)
    with pytest.raises(ValueError, match="no RoPE theta"):
        spec_from_hf_config({k: v for k, v in base.items() if k != "rope_theta"})
    with pytest.raises(ValueError, match="disagrees"):
        spec_from_hf_config(dict(five, rope_theta=10000.0))
    with pytest.raises(ValueError, match="disagrees"):
        spec_from_hf_config(dict(five, rope_scaling=dict(LLAMA3, factor=2.0)))
    no_factor = {k: v for k, v in LLAMA3.items() if k != "factor"}
    with pytest.raises(ValueError, match="factor"):
        spec_from_hf_config(dict(base, rope_scaling=no_factor))
    with pytest.raises(ValueError, match="partial_rotary_factor"):
        spec_from_hf_config(dict(five, rope_parameters=dict(five["rope_parameters"], partial_rotary_factor=0.5)))
    nested = {"full_attention": five["rope_parameters"], "sliding_attention": five["rope_parameters"]}
    with pytest.raises(ValueError, match="per-layer-type"):
        spec_from_hf_config(dict(five, rope_parameters=nested))


def test_llama3_values_megatron_cannot_build_are_refused():
    spec = spec_from_hf_config(dict(CONFIGS["Llama-3.1-8B-Instruct"], rope_scaling=dict(LLAMA3, low_freq_factor=2.0)))
    with pytest.raises(ValueError, match="low_freq_factor"):
        _rope_args(spec)


def test_installed_transformers_config_round_trips(tmp_path):
    """Whatever layout the installed transformers writes is read and exported back as written."""
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
                num_hidden_layers=2, vocab_size=300, head_dim=16, max_position_embeddings=131072,
                rope_theta=500000.0, rope_scaling=dict(LLAMA3),
                architectures=["LlamaForCausalLM"]).save_pretrained(tmp_path / "hf")
    written = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert ("rope_parameters" in written) == (TF_MAJOR >= 5)
    spec = read_spec(tmp_path / "hf")
    assert spec.rotary_base == 500000.0 and spec.rope_scaling == LLAMA3
    save_hf_config(spec, tmp_path / "out")
    assert _without_version(json.loads((tmp_path / "out" / "config.json").read_text())) == _without_version(written)
