"""`python -m megatron_tip.plan` on every example config: report structure, and the paper pairs fit."""
import importlib.util
import json
from types import SimpleNamespace

import pytest

from megatron_tip.config import load_config
from megatron_tip.plan import preflight
from megatron_tip.plan.__main__ import main
from megatron_tip.plan.memory import PHASES
from tests.helpers.paths import REPO

CONFIGS = sorted((REPO / "examples" / "configs").glob("*.yaml"))
_spec = importlib.util.spec_from_file_location("plan_paper_configs", REPO / "tools" / "plan_paper_configs.py")
paper = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(paper)


def _plan(capsys, argv):
    assert main(argv) == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_plan_runs_on_every_example_config(config, capsys):
    plan = json.loads(_plan(capsys, ["--config", str(config), "--json"]))
    assert plan["stages"] and plan["peak_bytes"] > 0 and plan["capacity_bytes"] > 0
    for stage in plan["stages"]:
        assert set(stage["phases"]) <= set(PHASES) and {"scoring", "gradient", "optimizer"} <= set(stage["phases"])
        for phase, total in stage["totals"].items():
            assert total == sum(stage["persistent"].values()) + sum(stage["phases"][phase].values())
        assert stage["peak"] == max(stage["totals"].values())
    assert plan["peak_bytes"] == max(s["peak"] for s in plan["stages"])
    if config.stem == "tiny_cpu":  # its models are here and this machine has no GPU: planned as the CPU run
        assert plan["layout"]["gpu"] == "cpu" and "time_s" not in plan
        return
    assert set(plan["time_s"]) == {"rollout", "teacher offload (host -> GPU)", "teacher scoring",
                                   "teacher hidden transfer", "student scoring", "gradient pass + optimizer",
                                   "weight sync"}
    assert all(t >= 0 for t in plan["time_s"].values()) and plan["time_s"]["gradient pass + optimizer"] > 0


@pytest.mark.parametrize("name", sorted(paper.CLUSTER))
def test_paper_pairs_fit_h100_nodes(name):
    """Each paper pair fits its cluster of H100s, not tightly: one 8-GPU node, the Qwen2.5 pair on 4 GPUs
    as in the paper (#23: the Llama pair, two nodes before, now fits one with per-role layouts)."""
    rc, out = paper.report(name, json_out=True)
    plan = json.loads(out)
    assert rc == 0 and plan["fits"] and not plan["tight"], (name, plan["peak_bytes"] / 2**30)
    assert plan["layout"]["gpu"] == "h100-80gb" and plan["layout"]["nodes"] == 1
    assert plan["layout"]["world"] == (4 if name == "qwen25_14b_to_1p5b" else 8)
    text = paper.report(name)[1]
    assert "-> FITS" in text and "Step time estimate" in text and "Per-GPU memory" in text


def test_config_memory_fields_change_the_plan(capsys):
    cfg = str(REPO / "examples/configs/qwen3_8b_to_4b.yaml")  # vLLM engine, sleep level 1

    def plan(*overrides):
        return json.loads(_plan(capsys, ["--config", cfg, "--json", *overrides]))

    base, full, awake = plan(), plan("student.recompute_granularity=full"), plan("rollout.vllm_sleep_level=0")
    grad = lambda p: p["stages"][0]["totals"]["gradient"]  # noqa: E731
    assert grad(full) < grad(base)
    assert full["time_s"]["gradient pass + optimizer"] > base["time_s"]["gradient pass + optimizer"]
    assert "vLLM reservation (awake)" in base["stages"][0]["phases"]["rollout"]
    assert "vLLM reservation (awake)" not in base["stages"][0]["persistent"]
    assert "vLLM reservation (awake)" in awake["stages"][0]["persistent"] and grad(awake) > grad(base)


def test_clear_errors(capsys):
    cfg = str(REPO / "examples/configs/qwen3_8b_to_4b.yaml")
    assert main(["--config", cfg, "--shape", "student=mistral-7b"]) == 2
    assert "known shapes" in capsys.readouterr().err
    assert main(["--config", cfg, "train.micro_batch_size=0"]) == 2
    assert "micro_batch_size" in capsys.readouterr().err


def test_preflight_text_on_cpu():
    from megatron_tip.plan.shapes import SHAPES

    cfg = load_config(str(REPO / "examples/configs/qwen3_8b_to_4b.yaml"))
    text = preflight(cfg, SimpleNamespace(world_size=8), SHAPES["qwen3-4b"].spec(), SHAPES["qwen3-8b"].spec())
    assert text.startswith("TIP step plan: preflight") and "TP=4 PP=1 DP=2" in text and "peak" in text


def test_a_cpu_config_is_planned_as_the_cpu_run(capsys):
    """tiny_cpu.yaml on a machine without a GPU: this machine, one process, params in M, no flash
    attention, no step time; the same report the trainer prints at start-up (preflight)."""
    from megatron_tip.checkpoint import read_spec
    from megatron_tip.plan.report import host_memory_bytes

    cfg_path = str(REPO / "examples/configs/tiny_cpu.yaml")
    text = _plan(capsys, ["--config", cfg_path])
    assert "this machine's CPU, 1 process: TP=1 PP=1 DP=1" in text
    assert "h100" not in text and "attention flash" not in text and "Step time estimate" not in text
    assert "0.68M params" in text and "1.84M params" in text  # the toy's 0.68M / 1.84M, not "0.00B"
    assert f"of {host_memory_bytes() / 2**30:.2f} GiB RAM -> FITS" in text
    cfg = load_config(cfg_path)
    pre = preflight(cfg, SimpleNamespace(world_size=1), read_spec(cfg.student.path), read_spec(cfg.teacher.path))
    assert pre.strip().split("\n")[1:] == text.strip().split("\n")[1:]  # only the title differs
    gpu = _plan(capsys, ["--config", cfg_path, "--gpu", "h100-80gb"])  # a GPU plan stays one flag away
    assert "8 x h100-80gb" in gpu and "Step time estimate" in gpu


@pytest.mark.parametrize("config,override,match", [
    ("qwen3_8b_to_4b", "parallel.tensor_parallel=16", "student num_query_groups=8 is not divisible by tensor_parallel size 16"),
    ("tiny_cpu", "parallel.tensor_parallel=1000000", "student num_attention_heads=2 is not divisible by tensor_parallel size 1000000"),
    ("tiny_cpu", "rollout.max_new_tokens=1000", "exceeds the student's max_position_embeddings=256"),
    ("tiny_cpu", "scoring.vocab_size=100000", "scoring.vocab_size=100000 is larger than the student's vocab_size=279"),
])
def test_planner_refuses_what_the_trainer_refuses_with_its_words(config, override, match, capsys):
    """One layout check (run_checks.check_layout) for both: the planner's line is the trainer's line."""
    from megatron_tip.run_checks import check_inputs

    path = str(REPO / "examples" / "configs" / f"{config}.yaml")
    assert main(["--config", path, override]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {match}"] or (len(err) == 1 and match in err[0]), err
    if config == "tiny_cpu":  # the trainer's own pre-load check (its models are here) says the same
        with pytest.raises(ValueError) as e:
            check_inputs(load_config(path, [override]))
        assert f"error: {e.value}" == err[0]


@pytest.mark.parametrize("override,expected", [([], 64), (["rollout.micro_batch_size=8"], 8),
                                                (["rollout.micro_batch_size=1000"], 64)])
def test_planned_rollout_batch_is_the_engines(override, expected):
    """The planner sizes the megatron engine's decode batch as build.py does: rollout.micro_batch_size,
    0 (default) = all of a rank's rollouts (16 prompts x 4 here), never more rows than there are."""
    from megatron_tip.checkpoint import read_spec
    from megatron_tip.plan.inputs import inputs_from_config

    cfg = load_config(str(REPO / "examples/configs/tiny_cpu.yaml"), override)
    inp = inputs_from_config(cfg, gpu="cpu", student=read_spec(cfg.student.path), teacher=read_spec(cfg.teacher.path))
    assert inp.workload.rollout_micro_batch == expected
