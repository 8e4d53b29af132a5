"""The shape table: published parameter totals, the same reader as a real config.json, path lookup."""
import json

import pytest

from megatron_tip.checkpoint import read_spec
from megatron_tip.plan.memory import total_params
from megatron_tip.plan.shapes import SHAPES, shape_for

# Non-embedding totals the Qwen model cards state next to the total (Llama cards state only totals).
NON_EMBEDDING = {"qwen3-1.7b": 1.4e9, "qwen3-4b": 3.6e9, "qwen3-8b": 6.95e9, "qwen2.5-1.5b": 1.31e9,
                 "qwen2.5-14b": 13.1e9}


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_parameter_count_matches_the_model_card(name):
    shape = SHAPES[name]
    spec = shape.spec()
    total = total_params(spec)
    assert total == pytest.approx(shape.published_params, rel=0.015)
    if name in NON_EMBEDDING:  # cards round to 2-3 digits
        emb = spec.vocab_size * spec.hidden_size * (1 if spec.tie_word_embeddings else 2)
        assert total - emb == pytest.approx(NON_EMBEDDING[name], rel=0.03)


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_table_entry_reads_like_a_config_json(name, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(SHAPES[name].config))
    assert read_spec(tmp_path).to_dict() == SHAPES[name].spec().to_dict()


def test_lookup_by_checkpoint_path():
    assert shape_for("/ckpt/Qwen2.5-14B-Instruct-thinking").name == "qwen2.5-14b"
    assert shape_for("/checkpoints/Llama-3.3-70B-Instruct/").name == "llama-3.3-70b"
    assert shape_for("qwen3-8b").name == "qwen3-8b"
    with pytest.raises(ValueError, match="known shapes: qwen3-1.7b"):
        shape_for("/ckpt/Mistral-7B")
