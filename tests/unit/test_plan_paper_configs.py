"""The paper configs are the layouts the planner ranks first on their clusters (#23, docs/planner.md §4)."""
import importlib.util
import json

import pytest

from megatron_tip.plan.suggest import TIE
from tests.helpers.paths import REPO

_spec = importlib.util.spec_from_file_location("plan_paper_configs", REPO / "tools" / "plan_paper_configs.py")
paper = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(paper)


@pytest.mark.parametrize("name", sorted(paper.CLUSTER))
def test_paper_config_is_the_fastest_layout_that_fits(name):
    rc, out = paper.report(name, json_out=True, suggest=True, extra=["--top", "1"])
    plan = json.loads(out)
    best = plan["suggestions"][0]
    given = sum(plan["time_s"].values())
    assert rc == 0 and plan["fits"] and not plan["tight"]
    # first, or within the search's tie of the fastest (the tie is ordered by memory)
    assert best["overrides"] == [] or given <= best["step_s"] * (1 + TIE), (name, best)


def test_llama_pair_estimate_dropped_by_orders_of_magnitude():
    """31,433 s per step before #23 (TP=8 x PP=2 on two nodes, megatron engine without a KV cache at PP>1)."""
    rc, out = paper.report("llama33_70b_to_llama31_8b", json_out=True)
    plan = json.loads(out)
    assert rc == 0 and plan["layout"]["world"] == 8
    assert paper.BEFORE["llama33_70b_to_llama31_8b"]["step_s"] / sum(plan["time_s"].values()) > 100
    rc, out = paper.before_report("llama33_70b_to_llama31_8b")  # the old YAML, from git, on its two nodes
    old = json.loads(out)
    assert rc == 0 and old["layout"]["world"] == 16 and sum(old["time_s"].values()) > 100 * sum(plan["time_s"].values())
