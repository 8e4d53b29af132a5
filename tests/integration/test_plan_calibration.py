"""The planner's memory model predicts a real training step's peak live-tensor memory (CPU, V=151,936).

Each case runs the trainer's own scoring pass + selection, gradient pass and optimizer step on
scaled-down models with the full Qwen vocabulary (megatron_tip.testing.step_memory) and compares
resident + per-phase peak bytes with the planner's per-stage phase totals. The full table
(docs/planner.md) comes from tools/calibrate_planner.py; CI runs two small cases: the trainer's
defaults (fused output layer; ops_impl=auto, whose compiled kernels run as plain ops under the
tracker) and the unfused gradient pass.
"""
import pytest

from megatron_tip.launch import run_distributed
from megatron_tip.testing.step_memory import Case, compare, make_models, measure_rank

SMALL = dict(student=dict(family="qwen3", hidden=32, layers=2, heads=4, kv_heads=2, ffn=64, tie=True),
             teacher=dict(family="qwen3", hidden=48, layers=2, heads=4, kv_heads=2, ffn=96, tie=False),
             rollouts=2, prompt_len=8, response_len=56, micro_batch=1, score_chunk_tokens=32)
CASES = [Case("tp1 rho=0.5 tied student, trainer defaults (fused, ops auto)", keep_ratio=0.5, ops_impl="auto",
              **SMALL),
         pytest.param(Case("tp2 rho=0.2 unfused output layer", tp=2, keep_ratio=0.2, fused_output_layer=False,
                           **SMALL), marks=pytest.mark.slow),  # CI time
         pytest.param(Case("pp2 rho=1 fused", pp=2, keep_ratio=1.0, **SMALL), marks=pytest.mark.slow)]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    make_models(Case("models", **SMALL), root)  # every case shares these shapes
    return root


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_planner_predicts_step_memory_within_10_percent(case, models):
    rows = compare(case, models, run_distributed(measure_rank, case.world, case, models, timeout=300))
    assert len(rows) == 3 * case.world
    for r in rows:
        assert abs(r["error"]) < 0.10, r
        assert r["measured_transient"] > 0
