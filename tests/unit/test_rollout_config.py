"""Rollout-engine constraints fail when the config is read (or, for the machine, when the run is
built but before any model loads), each with one line naming the key and what is allowed."""
from types import SimpleNamespace

import pytest
import torch

from megatron_tip.config import load_config
from megatron_tip.rollout import check_engine
from megatron_tip.rollout.colocated import check_layout


def _error(overrides: list[str]) -> str:
    with pytest.raises(ValueError) as e:
        load_config(None, overrides)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


@pytest.mark.parametrize("level", ["3", "-1", "1.5"])
def test_sleep_level_range(level):
    assert "vllm_sleep_level" in _error([f"rollout.vllm_sleep_level={level}"])


def test_sleep_level_values_load():
    for level in (0, 1, 2):
        assert load_config(None, [f"rollout.vllm_sleep_level={level}"]).rollout.vllm_sleep_level == level


@pytest.mark.parametrize("engine", ["megatron", "vllm"])
def test_greedy_with_several_samples_refused(engine):
    msg = _error([f"rollout.engine={engine}", "rollout.temperature=0", "rollout.samples_per_prompt=4"])
    assert "temperature=0" in msg and "samples_per_prompt=4" in msg
    cfg = load_config(None, ["rollout.temperature=0", "rollout.samples_per_prompt=1"])
    assert cfg.rollout.temperature == 0


def test_vllm_with_pipeline_parallel_refused_at_load():
    msg = _error(["rollout.engine=vllm", "parallel.pipeline_parallel=2"])
    assert "rollout.engine=vllm needs parallel.pipeline_parallel=1" in msg and "megatron" in msg
    assert load_config(None, ["rollout.engine=megatron", "parallel.pipeline_parallel=2"]).parallel.pipeline_parallel == 2


def _ctx(**kw):
    base = dict(rank=0, world_size=1, local_rank=0, tp=1, pp=1, tp_rank=0, tp_group=None)
    return SimpleNamespace(**{**base, **kw})


def test_vllm_constraints_have_one_source():
    """The PP=1 refusal at load and in the colocated engine is one function (one message); the sleep
    levels the config accepts are the ones the engine checks."""
    from megatron_tip.rollout import config as rollout_config
    from megatron_tip.rollout import vllm_engine

    at_load = _error(["rollout.engine=vllm", "parallel.pipeline_parallel=3"])
    with pytest.raises(ValueError) as at_build:
        check_layout(_ctx(pp=3, world_size=3))
    assert str(at_build.value) == at_load
    assert vllm_engine.SLEEP_LEVELS is rollout_config.SLEEP_LEVELS
    for level in rollout_config.SLEEP_LEVELS:
        assert load_config(None, ["rollout.engine=vllm", f"rollout.vllm_sleep_level={level}"])
    with pytest.raises(ValueError, match="rollout.vllm_sleep_level=3: must be one of 0, 1, 2"):
        vllm_engine.check_sleep_supported(3)


def test_layout_checks(monkeypatch):
    with pytest.raises(ValueError, match="pipeline_parallel=1"):
        check_layout(_ctx(pp=2, world_size=2))
    # TP groups must be consecutive ranks (megatron's default order); a strided group is refused.
    import megatron_tip.rollout.colocated as colocated

    monkeypatch.setattr(colocated.dist, "get_process_group_ranks", lambda group: [1, 3])
    with pytest.raises(ValueError, match=r"consecutive ranks.*\[1, 3\]"):
        check_layout(_ctx(rank=1, world_size=4, tp=2, tp_rank=0))
    monkeypatch.setattr(colocated.dist, "get_process_group_ranks", lambda group: [2, 3])
    check_layout(_ctx(rank=3, world_size=4, tp=2, tp_rank=1))


def test_check_engine_before_models(monkeypatch):
    """What build() checks first: nothing for megatron; for vllm the install and, without CUDA, sleep mode."""
    vllm_cfg = load_config(None, ["rollout.engine=vllm", "rollout.vllm_sleep_level=1"]).rollout
    check_engine(load_config(None, ["rollout.vllm_sleep_level=1"]).rollout, ctx=_ctx())  # megatron: ignored
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "vllm" else real(name, *a))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="vllm_sleep_level=1 needs vLLM on CUDA GPUs"):
            check_engine(vllm_cfg, ctx=_ctx())
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    with pytest.raises(ValueError, match="requirements/cpu-vllm.txt"):
        check_engine(vllm_cfg, ctx=_ctx())


def test_rollout_micro_batch_size_is_its_own_setting():
    assert load_config(None, []).rollout.micro_batch_size == 0  # all rollouts of a step decode together
    assert load_config(None, ["rollout.micro_batch_size=8", "train.micro_batch_size=2"]).rollout.micro_batch_size == 8
    assert "micro_batch_size" in _error(["rollout.micro_batch_size=-1"])


@pytest.mark.parametrize("overrides,needle", [
    (["rollout.engine=vllm", "parallel.tensor_parallel=2", "rollout.tensor_parallel=4"],
     "rollout.tensor_parallel=4 must divide parallel.tensor_parallel=2"),
    (["rollout.engine=vllm", "parallel.tensor_parallel=4", "rollout.tensor_parallel=3"],
     "rollout.tensor_parallel=3 must divide parallel.tensor_parallel=4"),
    (["rollout.engine=megatron", "parallel.tensor_parallel=2", "rollout.tensor_parallel=1"],
     "rollout.tensor_parallel=1: rollout.engine=megatron samples with the student itself"),
    (["rollout.tensor_parallel=-1"], "rollout.tensor_parallel=-1"),
])
def test_rollout_tensor_parallel_refused_at_load(overrides, needle):
    assert needle in _error(overrides)


def test_rollout_tensor_parallel_and_eager_values():
    def cfg(*o):
        return load_config(None, list(o))

    for student, engine in ((2, 1), (4, 2), (4, 1), (2, 2), (2, 0)):
        r = cfg("rollout.engine=vllm", f"parallel.tensor_parallel={student}", f"rollout.tensor_parallel={engine}").rollout
        assert r.engine_tensor_parallel(student_tensor_parallel=student) == (engine or student)
    # the megatron engine accepts only the student's own TP (0 or equal)
    assert cfg("parallel.tensor_parallel=2", "rollout.tensor_parallel=2").rollout.tensor_parallel == 2
    auto = cfg().rollout
    assert auto.enforce_eager(cuda=False) is True and auto.enforce_eager(cuda=True) is False
    for value in (True, False):
        r = cfg(f"rollout.vllm_enforce_eager={str(value).lower()}").rollout
        assert r.enforce_eager(cuda=False) is value and r.enforce_eager(cuda=True) is value


def test_engine_tp_checked_against_the_machine_layout(monkeypatch):
    import megatron_tip.rollout.colocated as colocated

    monkeypatch.setattr(colocated.dist, "get_process_group_ranks", lambda group: [0, 1])
    with pytest.raises(ValueError, match=r"rollout.tensor_parallel=4 must divide parallel.tensor_parallel=2"):
        check_layout(_ctx(world_size=2, tp=2), engine_tp=4)
    check_layout(_ctx(world_size=2, tp=2), engine_tp=1)
    cfg = load_config(None, ["rollout.engine=vllm", "rollout.tensor_parallel=1", "parallel.tensor_parallel=2"])
    monkeypatch.setattr("importlib.util.find_spec", lambda name: object())  # as if vLLM were installed
    cfg.rollout.tensor_parallel = 3  # a layout the config check would refuse, seen by the machine check too
    with pytest.raises(ValueError, match="rollout.tensor_parallel=3"):
        check_engine(cfg.rollout, ctx=_ctx(world_size=2, tp=2))


def test_prompt_shares():
    from megatron_tip.rollout.colocated import prompt_shares

    assert prompt_shares(5, parts=2) == [range(0, 3), range(3, 5)]
    assert prompt_shares(1, parts=4) == [range(0, 1), range(1, 1), range(1, 1), range(1, 1)]
    for n in range(9):
        for parts in (1, 2, 4):
            shares = prompt_shares(n, parts=parts)
            assert [i for s in shares for i in s] == list(range(n))
            assert max(map(len, shares)) - min(map(len, shares)) <= 1
