"""Per-role layouts in the planner (#23): teacher own TP/PP, offload, vLLM engines' TP, CUDA graphs, --suggest.

Reference numbers are hand counts from the model shapes (not the planner's helpers)."""
import json

import pytest

from megatron_tip.config import load_config
from megatron_tip.plan import build_plan, inputs_from_config
from megatron_tip.plan.__main__ import main
from megatron_tip.plan.devices import DEVICES, EFFICIENCY, GRAPH_STEP_OVERHEAD_S, LAUNCH_OVERHEAD_S
from megatron_tip.plan.memory import plan_memory, vllm_kv_capacity_tokens
from megatron_tip.plan.roles import rollout_engines
from megatron_tip.plan.shapes import SHAPES
from megatron_tip.plan.timing import step_time
from tests.helpers.paths import REPO

GiB = 2**30
LLAMA = str(REPO / "examples/configs/llama33_70b_to_llama31_8b.yaml")
QWEN = str(REPO / "examples/configs/qwen3_8b_to_4b.yaml")
H100 = DEVICES["h100-80gb"]


def _inp(path, *overrides, **kw):
    return inputs_from_config(load_config(path, list(overrides)), **kw)


def _layer(spec, tp):
    """Hand count of one layer's parameters on a TP rank (Llama/Qwen3: no qkv bias)."""
    h, d, f, a, g = (spec.hidden_size, spec.head_dim, spec.ffn_hidden_size, spec.num_attention_heads,
                     spec.num_query_groups)
    return h * (a + 2 * g) * d // tp + a * d // tp * h + 3 * h * f // tp + 2 * h + (2 * d if spec.qk_layernorm else 0)


def test_own_layout_teacher_weights_per_rank_are_its_stage_plus_the_head_in_the_student_layout():
    """70B teacher at TP=2 x PP=4 under a TP=4 student: a rank holds 20 of 80 layers at TP=2, the
    embedding [V/2, H] (first teacher stage: the worst), and the output layer's [V/4, H] shard."""
    inp = _inp(LLAMA, "teacher.offload=false", gpu="h100-80gb")
    t = SHAPES["llama-3.3-70b"].spec()
    emb2 = 128256 * t.hidden_size  # 128,256 rows: a multiple of 128 x 2 (no padding at TP=2)
    emb4 = 128512 * t.hidden_size  # padded to a multiple of 128 x 4 (the student's TP)
    want = (20 * _layer(t, 2) + emb2 // 2 + emb4 // 4) * 2
    assert plan_memory(inp)[0].persistent["teacher weights"] == want
    # the same layout: the student's TP=4 x PP=1 share of everything
    same = _inp(LLAMA, "teacher.offload=false", "teacher.parallel.tensor_parallel=0",
                "teacher.parallel.pipeline_parallel=0", gpu="h100-80gb")
    assert plan_memory(same)[0].persistent["teacher weights"] == (80 * _layer(t, 4) + emb4 // 4 * 2 + t.hidden_size) * 2


def test_teacher_offload_moves_exactly_its_weights_to_the_scoring_pass():
    on = plan_memory(_inp(LLAMA, gpu="h100-80gb"))[0]
    off = plan_memory(_inp(LLAMA, "teacher.offload=false", gpu="h100-80gb"))[0]
    w = off.persistent["teacher weights"]
    assert "teacher weights" not in on.persistent and on.phases["scoring"]["teacher weights (loaded from host)"] == w
    assert on.total("scoring") == off.total("scoring")
    for phase in ("rollout", "gradient", "optimizer"):
        assert off.total(phase) - on.total(phase) == w
    t = step_time(_inp(LLAMA, gpu="h100-80gb"))
    assert t["teacher offload (host -> GPU)"] == pytest.approx(w / (H100.pcie_bytes_s * EFFICIENCY["link"]))
    assert step_time(_inp(LLAMA, "teacher.offload=false", gpu="h100-80gb"))["teacher offload (host -> GPU)"] == 0
    plan = build_plan(_inp(LLAMA, gpu="h100-80gb"))
    assert plan["roles"]["teacher"]["host_bytes_per_node"] == 8 * w


def test_own_layout_teacher_hidden_states_before_and_after_the_redistribution():
    """Teacher DP=1 scores all 8 x 16 rollouts; each TP=4 x DP=2 student rank receives its 64 rows."""
    inp = _inp(LLAMA, gpu="h100-80gb")
    rows = lambda n: n * 10240 * 8192 * 2  # noqa: E731  [rows, S, H_T] bf16
    scoring = plan_memory(inp)[0].phases["scoring"]
    assert scoring["teacher hidden, own layout (before the redistribution)"] == rows(128)
    assert scoring["teacher hidden (kept to the gradient pass)"] == rows(64)
    plan = build_plan(inp)
    assert plan["roles"]["teacher"]["hidden_recv_bytes_per_rank"] == rows(64)
    # sent: 64 rows to each of 4 TP ranks of 2 DP groups, from the teacher's 2 TP x 1 DP last-stage ranks
    link = H100.nvlink_bytes_s * EFFICIENCY["link"]
    assert plan["time_s"]["teacher hidden transfer"] == pytest.approx(rows(64) * 8 / 2 / link)
    same = build_plan(_inp(QWEN, "teacher.parallel.tensor_parallel=0", "teacher.parallel.pipeline_parallel=0",
                           gpu="h100-80gb"))
    assert same["time_s"]["teacher hidden transfer"] == 0
    assert "teacher hidden, own layout (before the redistribution)" not in same["stages"][0]["phases"]["scoring"]


def test_rollout_engines_own_tp_kv_capacity_per_engine():
    """Qwen3-4B engines of TP=1 under a TP=2 student: 8 engines, 1 prompt x 16 samples each; the KV
    capacity is what the 0.4 x 80 GB reservation holds after the whole model (TP=1), 2 GiB of
    activations and 1 GiB of CUDA graphs, at 36 layers x 8 KV heads x 128 x 2 (K, V) x bf16 per token."""
    inp = _inp(QWEN, "rollout.tensor_parallel=1", gpu="h100-80gb")
    assert rollout_engines(inp) == {"tp": 1, "count": 8, "rollouts": 16}
    s = SHAPES["qwen3-4b"].spec()
    weights = (36 * _layer(s, 1) + 151936 * s.hidden_size + s.hidden_size) * 2  # tied: one [V, H]
    per_token = 2 * 36 * 8 * 128 * 2
    res = int(0.4 * H100.memory_bytes)
    assert vllm_kv_capacity_tokens(inp) == (res - weights - 2 * GiB - GiB) // per_token
    eager = _inp(QWEN, "rollout.tensor_parallel=1", "rollout.vllm_enforce_eager=true", gpu="h100-80gb")
    assert vllm_kv_capacity_tokens(eager) == (res - weights - 2 * GiB) // per_token


def test_cuda_graphs_drop_the_per_layer_launch_cost_of_every_decoded_token():
    graphs = _inp(QWEN, gpu="h100-80gb")
    eager = _inp(QWEN, "rollout.vllm_enforce_eager=true", gpu="h100-80gb")
    assert not graphs.settings.vllm_enforce_eager and eager.settings.vllm_enforce_eager  # null: false on CUDA
    waves = 1  # each TP=4 engine holds its 64 x 10,240 tokens with or without the graph pool
    assert all(-(-64 * 10240 // vllm_kv_capacity_tokens(i)) == waves for i in (graphs, eager))
    per_token = 36 * LAUNCH_OVERHEAD_S["vllm"] - GRAPH_STEP_OVERHEAD_S
    assert step_time(eager)["rollout"] - step_time(graphs)["rollout"] == pytest.approx(waves * 8192 * per_token)
    # the megatron engine is always eager: the key does not change it
    meg = [step_time(_inp(QWEN, "rollout.engine=megatron", f"rollout.vllm_enforce_eager={v}", gpu="h100-80gb"))
           for v in ("true", "false")]
    assert meg[0]["rollout"] == meg[1]["rollout"]


def test_per_role_layout_is_printed(capsys):
    assert main(["--config", LLAMA]) == 0
    out = capsys.readouterr().out
    assert "layout   8 x h100-80gb (1 node): TP=4 PP=1 DP=2" in out
    assert "teacher  TP=2 PP=4 DP=1 (own layout" in out and "offload: 17.41 GiB per GPU" in out
    assert "rollout  vllm: 2 engine(s) x TP=4, 64 rollouts each, CUDA graphs" in out
    assert main(["--config", QWEN, "--json", "teacher.parallel.tensor_parallel=0", "rollout.tensor_parallel=0"]) == 0
    roles = json.loads(capsys.readouterr().out)["roles"]
    assert roles["teacher"] == {**roles["teacher"], "tp": 4, "pp": 1, "dp": 2, "own_layout": False}
    assert roles["rollout"] == {**roles["rollout"], "engine": "vllm", "tp": 4, "engines": 2, "cuda_graphs": True}


@pytest.mark.parametrize("override,match", [
    ("teacher.parallel.tensor_parallel=3", "teacher.parallel: world size 8 is not divisible by "
                                           "teacher.parallel.tensor_parallel (3) x teacher.parallel.pipeline_parallel (4) = 12"),
    ("teacher.parallel.pipeline_parallel=3", "teacher.parallel.pipeline_parallel (3) = 6"),
    ("teacher.parallel.tensor_parallel=16", "teacher.parallel.tensor_parallel (16) x teacher.parallel.pipeline_parallel (4) = 64"),
    ("rollout.tensor_parallel=3", "rollout.tensor_parallel=3 must divide parallel.tensor_parallel=4"),
])
def test_layouts_that_cannot_work_fail_naming_the_key(override, match, capsys):
    assert main(["--config", LLAMA, "--nodes", "1", override]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and match in err[0], err


def test_teacher_layout_checked_against_the_teacher_not_the_student(capsys):
    """Qwen3-8B's 36 layers do not split into 8 teacher stages; the student's layout is not the measure."""
    assert main(["--config", QWEN, "teacher.parallel.tensor_parallel=1", "teacher.parallel.pipeline_parallel=8"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: teacher num_layers=36 is not divisible by teacher.parallel.pipeline_parallel size 8"
    assert main(["--config", QWEN, "--gpu", "cpu", "--suggest"]) == 2
    assert "--suggest needs a GPU target" in capsys.readouterr().err


def test_hidden_transfer_crosses_nodes_over_infiniband():
    one = step_time(_inp(QWEN, gpu="h100-80gb"))["teacher hidden transfer"]
    two = step_time(_inp(QWEN, "train.prompts_per_step=16", gpu="h100-80gb", nodes=2))["teacher hidden transfer"]
    # the same rows per rank (16 prompts on DP=8 vs 8 on DP=4), NVLink vs InfiniBand per GPU
    assert two / one == pytest.approx(H100.nvlink_bytes_s / H100.internode_bytes_s)


def _reload(path, overrides, **kw):
    """The suggestion applied the way a user applies it: dotted overrides through load_config."""
    return build_plan(_inp(path, *overrides, **kw))


@pytest.mark.parametrize("path,slow,kw", [
    (QWEN, ["rollout.vllm_enforce_eager=true", "rollout.tensor_parallel=0", "teacher.parallel.tensor_parallel=0"], {}),
    (LLAMA, ["teacher.offload=false", "teacher.parallel.tensor_parallel=0", "teacher.parallel.pipeline_parallel=0"],
     {}),  # does not fit (90 GiB)
])
def test_suggested_layouts_fit_and_are_not_slower_than_the_given_one(path, slow, kw, capsys):
    from megatron_tip.plan.suggest import override_args

    given = _reload(path, slow, gpu="h100-80gb")
    assert main(["--config", path, "--json", "--suggest", "--top", "3", *slow]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["suggestions"]
    for s in out["suggestions"]:
        plan = _reload(path, slow + s["overrides"], gpu="h100-80gb")
        assert plan["fits"] and not plan["tight"] and plan["peak_bytes"] == s["peak_bytes"]
        assert sum(plan["time_s"].values()) == pytest.approx(s["step_s"])
        if given["fits"] and not given["tight"]:
            assert s["step_s"] <= sum(given["time_s"].values()) * 1.01  # the given layout is in the search
    assert override_args({"teacher.offload": True, "parallel.tensor_parallel": 4}) == [
        "teacher.offload=true", "parallel.tensor_parallel=4"]


def test_suggest_searches_a_cluster_the_given_layout_does_not_tile(capsys):
    """The pre-#23 Llama layout (TP=8 x PP=2, 16 ranks) on one node: refused, then searched from scratch."""
    old = ["parallel.tensor_parallel=8", "parallel.pipeline_parallel=2", "rollout.engine=megatron",
           "teacher.parallel.tensor_parallel=0", "teacher.parallel.pipeline_parallel=0", "rollout.tensor_parallel=0"]
    assert main(["--config", LLAMA, "--nodes", "1", *old]) == 2
    capsys.readouterr()
    assert main(["--config", LLAMA, "--nodes", "1", "--suggest", "--top", "1", *old]) == 0
    out = capsys.readouterr().out
    assert "the given layout does not run on this cluster" in out and "Suggested layouts on 8 x h100-80gb" in out
    assert "parallel.pipeline_parallel=1" in out
