"""A teacher layout that cannot work (teacher.parallel) fails before any model loads: one line naming the key.

The toy teacher has 4 heads, 2 kv heads, 512 ffn and 3 layers; the student runs TP=1 x PP=1.
"""
import re

import pytest

from megatron_tip.config import load_config
from megatron_tip.run_checks import check_inputs
from megatron_tip.teacher import has_own_layout, teacher_layout
from megatron_tip.train import main
from tests.helpers.paths import REPO

TINY = str(REPO / "examples" / "configs" / "tiny_cpu.yaml")


@pytest.mark.parametrize("overrides,world,match", [
    (["teacher.parallel.tensor_parallel=4"], 4,
     "teacher num_query_groups=2 is not divisible by teacher.parallel.tensor_parallel size 4"),
    (["teacher.parallel.tensor_parallel=3"], 3,
     "teacher num_attention_heads=4 is not divisible by teacher.parallel.tensor_parallel size 3"),
    (["teacher.parallel.pipeline_parallel=2"], 2,
     "teacher num_layers=3 is not divisible by teacher.parallel.pipeline_parallel size 2"),
    (["teacher.parallel.pipeline_parallel=6"], 6,  # more stages than layers
     "teacher num_layers=3 is not divisible by teacher.parallel.pipeline_parallel size 6"),
    (["teacher.parallel.tensor_parallel=2"], 3,
     "teacher.parallel: world size 3 is not divisible by teacher.parallel.tensor_parallel (2) x "
     "teacher.parallel.pipeline_parallel (1) = 2"),
    (["teacher.parallel.tensor_parallel=2", "teacher.parallel.pipeline_parallel=3"], 4,
     "teacher.parallel: world size 4 is not divisible by teacher.parallel.tensor_parallel (2) x "
     "teacher.parallel.pipeline_parallel (3) = 6"),
])
def test_impossible_teacher_layouts_are_named(overrides, world, match):
    cfg = load_config(TINY, overrides + ["train.prompts_per_step=12"])
    with pytest.raises(ValueError) as e:
        check_inputs(cfg, world_size=world)
    assert str(e.value) == match


def test_a_working_teacher_layout_passes_and_resolves():
    cfg = load_config(TINY, ["teacher.parallel.tensor_parallel=2", "train.prompts_per_step=4"])
    check_inputs(cfg, world_size=4)
    assert teacher_layout(cfg) == (2, 1) and has_own_layout(cfg)
    same = load_config(TINY, ["teacher.parallel.tensor_parallel=1"])  # the student's layout, spelled out
    assert teacher_layout(same) == (1, 1) and not has_own_layout(same)


def test_the_train_cli_exits_2_before_any_process_group(capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        main(["--config", TINY, f"run.out_dir={tmp_path / 'run'}", "teacher.parallel.tensor_parallel=4"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.fullmatch(r"error: teacher num_query_groups=2 is not divisible by "
                                          r"teacher\.parallel\.tensor_parallel size 4", err[0]), err
    assert not (tmp_path / "run").exists()


def test_an_own_layout_teacher_from_a_megatron_checkpoint_is_refused(tmp_path):
    (tmp_path / "t").mkdir()  # no config.json: what a megatron checkpoint dir looks like to the check
    cfg = load_config(TINY, [f"teacher.path={tmp_path / 't'}", "teacher.parallel.tensor_parallel=2"])
    from megatron_tip.teacher import check_teacher_source

    with pytest.raises(ValueError, match=r"teacher.parallel: a teacher in its own layout loads from an HF "):
        check_teacher_source(cfg)
