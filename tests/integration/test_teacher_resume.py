"""A run with the teacher in its own layout resumes bit-exactly, and the teacher is never checkpointed.

2 gloo ranks: the student at TP=1 x DP=2, the teacher at teacher.parallel.tensor_parallel=2 (its own
groups). Four uninterrupted steps vs two steps, stop, resume, two more: the same losses bit for bit.
The teacher is frozen: a training checkpoint holds the student's tensors only (each has the student's
hidden size 32 as a dimension; no teacher tensor does), and a resumed run rebuilds the teacher from teacher.path.
"""
import json

import pytest

from megatron_tip.launch import run_distributed
from tests.helpers.paths import REPO
from tests.helpers.trainer_cases import make_pair, overrides, run_train_main

pytestmark = pytest.mark.timeout(600)
EMPTY = str(REPO / "tests/helpers/empty.yaml")
OWN = {"teacher.parallel.tensor_parallel": 2, "train.steps": 4}


def _run(root, teacher, student, out, **kw):
    argv = ["--config", EMPTY, *overrides(root, teacher, student, **{**OWN, "run.out_dir": out, **kw})]
    results = run_distributed(run_train_main, 2, argv, timeout=500)
    assert all(r[0] == "ok" for r in results), results
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_an_own_layout_teacher_run_resumes_bit_exactly(tmp_path):
    from megatron.core import dist_checkpointing

    teacher, student = make_pair(tmp_path)
    full = _run(tmp_path, teacher, student, tmp_path / "full")
    cut = _run(tmp_path, teacher, student, tmp_path / "cut", **{"run.exit_interval": 2})
    assert len(cut) == 2
    ckpts = sorted((tmp_path / "cut" / "checkpoints").glob("step_*"))
    assert ckpts, "no checkpoint written"
    saved = dist_checkpointing.load_tensors_metadata(str(ckpts[-1] / "model"))
    # Every student tensor has a hidden (32) dimension; none of the teacher's (hidden 64, heads of 16) has.
    assert saved and all(32 in meta.global_shape for meta in saved.values()), \
        {k: m.global_shape for k, m in saved.items() if 32 not in m.global_shape}
    resumed = _run(tmp_path, teacher, student, tmp_path / "cut", **{"run.resume": "true"})
    assert len(full) == len(resumed) == 4
    assert full == resumed, (full, resumed)
