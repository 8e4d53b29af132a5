"""The teacher's own process groups enumerate ranks exactly as megatron's parallel_state does.

``teacher.groups.rank_enum`` writes out what ``HyperCommGrid`` would compute (the grid needs einops,
which megatron-core does not install); the reference is megatron's own ``RankGenerator``, the
enumeration ``initialize_model_parallel`` builds its groups from (default order tp-cp-ep-dp-pp).
"""
import pytest
from megatron.core.parallel_state import RankGenerator

from megatron_tip.teacher.exchange import teacher_rows
from megatron_tip.teacher.groups import rank_enum


@pytest.mark.parametrize("tp,dp,pp", [(1, 4, 1), (4, 1, 1), (2, 2, 1), (2, 1, 2), (1, 2, 2), (2, 2, 2), (4, 2, 3)])
def test_rank_enumeration_matches_megatron(tp, dp, pp):
    ref = RankGenerator(tp=tp, ep=1, dp=dp, pp=pp, cp=1, order="tp-cp-ep-dp-pp")
    sizes = {"tp": tp, "cp": 1, "dp": dp, "pp": pp}
    for dims, token in ((("tp",), "tp"), (("dp",), "dp"), (("pp",), "pp"), (("cp", "dp"), "dp-cp"),
                        (("tp", "pp"), "tp-pp"), (("tp", "cp"), "tp-cp")):
        assert rank_enum(sizes, dims) == ref.get_ranks(token), (dims, token)


@pytest.mark.parametrize("n,dp", [(8, 2), (7, 3), (2, 4), (0, 2)])
def test_teacher_rows_cover_the_global_batch_once_in_order(n, dp):
    rows = [g for e in range(dp) for g in teacher_rows(n, teacher_dp=dp, dp_rank=e)]
    assert rows == list(range(n))
    sizes = [len(teacher_rows(n, teacher_dp=dp, dp_rank=e)) for e in range(dp)]
    assert max(sizes) - min(sizes) <= 1
