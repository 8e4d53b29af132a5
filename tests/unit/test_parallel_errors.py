"""Bad parallel layouts and model specs fail fast with the numbers in the message."""
import pytest
from megatron_tip.distributed import check_parallel_sizes
from megatron_tip.models import ModelSpec, check_model_parallel


def test_world_not_divisible():
    with pytest.raises(ValueError, match=r"world size 6 .*tensor_parallel \(4\).*= 4"):
        check_parallel_sizes(6, tp=4, pp=1)
    assert check_parallel_sizes(8, tp=2, pp=2) == 2


def test_heads_not_divisible_by_tp():
    spec = ModelSpec(family="llama", num_layers=2, hidden_size=96, num_attention_heads=6,
                     num_query_groups=6, ffn_hidden_size=128, vocab_size=100)
    with pytest.raises(ValueError, match="num_attention_heads=6 is not divisible by tensor_parallel size 4"):
        check_model_parallel(spec, tp=4, pp=1)
    with pytest.raises(ValueError, match="num_layers=2 is not divisible by pipeline_parallel size 3"):
        check_model_parallel(spec, tp=1, pp=3)


def test_spec_validation():
    with pytest.raises(ValueError, match="num_query_groups"):
        ModelSpec(family="llama", num_layers=2, hidden_size=64, num_attention_heads=4,
                  num_query_groups=3, ffn_hidden_size=128, vocab_size=100)
