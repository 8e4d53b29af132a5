"""Runs and checkpoints cannot be hijacked, mixed up or lost (issue #12): run identity, resume,
summary and metrics on resume, atomic state files, planted pickles, skipped-step cap."""
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from megatron_tip.checkpoint.manifest import write_manifest
from megatron_tip.launch import run_distributed
from tests.helpers.paths import REPO
from tests.helpers.trainer_cases import PROMPTS, make_pair, overrides, poison_teacher, run_train_main

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("pair")
    return (root,) + make_pair(root)



def train(pair, out, **kw):
    root, teacher, student = pair
    argv = ["--config", str(REPO / "tests/helpers/empty.yaml"),
            *overrides(root, teacher, student, **{"train.steps": 4, "run.out_dir": out, **kw})]
    return run_distributed(run_train_main, 1, argv)[0]


def cli(pair, out, *extra, **kw):
    """The real CLI in a subprocess: (exit code, stdout, stderr)."""
    root, teacher, student = pair
    argv = overrides(root, teacher, student, **{"train.steps": 4, "run.out_dir": out, **kw})
    res = subprocess.run([sys.executable, "-m", "megatron_tip.train", "--config",
                          str(REPO / "tests/helpers/empty.yaml"), *argv, *extra],
                         capture_output=True, text=True, timeout=300, cwd=REPO,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    return res.returncode, res.stdout, res.stderr


def steps(out):
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def losses(out):
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def one_error_line(stderr: str, match: str) -> None:
    lines = [ln for ln in stderr.strip().splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1 and match in lines[0], stderr[-2000:]
    assert "Traceback" not in stderr, stderr[-2000:]


@pytest.fixture(scope="module")
def full(pair, tmp_path_factory):
    """An uninterrupted 4-step run: the reference loss curve."""
    out = tmp_path_factory.mktemp("full") / "run"
    assert train(pair, out)[0] == "ok"
    return out


def test_fresh_run_into_another_runs_dir_is_refused_unless_overwrite(pair, full, tmp_path):
    code, _, err = cli(pair, full)
    assert code == 2
    one_error_line(err, "already holds a run")
    assert len(steps(full)) == 4  # nothing of the other run was touched
    out = tmp_path / "copy"
    shutil.copytree(full, out)
    assert train(pair, out, **{"run.overwrite": "true", "train.steps": 2})[0] == "ok"
    assert steps(out) == [0, 1] and not (out / "checkpoints" / "step_000003").exists()


@pytest.mark.slow  # CI time; CI keeps the SIGTERM, planted-pickle and refusal tests
def test_resume_refuses_another_runs_checkpoints(pair, full, tmp_path):
    out = tmp_path / "other"
    shutil.copytree(full, out)
    code, _, err = cli(pair, out, **{"run.resume": "auto", "optim.lr": 5e-4})
    assert code == 2
    one_error_line(err, "optim.lr: 0.001 -> 0.0005")
    legacy = tmp_path / "legacy"  # checkpoints without run.json (an older version or a copy)
    shutil.copytree(full, legacy)
    (legacy / "run.json").unlink()
    assert train(pair, legacy, **{"run.resume": "true"}) == ("exit", 2)


def test_resume_without_checkpoint_is_a_clear_error(pair, tmp_path):
    code, _, err = cli(pair, tmp_path / "nothing", **{"run.resume": "true"})
    assert code == 2
    one_error_line(err, "no complete checkpoint under")


def test_resuming_a_finished_run_keeps_its_summary(pair, tmp_path):
    out = tmp_path / "done"
    assert train(pair, out, **{"eval.prompts": PROMPTS, "eval.limit": 2})[0] == "ok"
    before = (out / "summary.json").read_text()
    assert json.loads(before)["eval"]["before"]["eval_n"] == 2
    for mode in ("true", "auto"):
        status, result = train(pair, out, **{"eval.prompts": PROMPTS, "eval.limit": 2, "run.resume": mode})
        assert status == "ok" and result["before_eval_n"] == 2
    assert (out / "summary.json").read_text() == before


@pytest.mark.slow  # CI time; CI keeps the SIGTERM, planted-pickle and refusal tests
def test_resume_rewinds_metrics_and_keeps_the_before_eval(pair, full, tmp_path):
    out = tmp_path / "cut"
    assert train(pair, out, **{"run.exit_interval": 2, "eval.prompts": PROMPTS, "eval.limit": 2})[0] == "ok"
    # A crash after the checkpoint at step 1 leaves steps 2 and 3 logged but not saved.
    with (out / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"step": 2, "loss": -1.0}) + "\n" + json.dumps({"step": 3, "loss": -1.0}) + "\n")
    status, result = train(pair, out, **{"run.resume": "auto", "eval.prompts": PROMPTS, "eval.limit": 2})
    assert status == "ok"
    assert steps(out) == [0, 1, 2, 3] and losses(out) == losses(full)
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["eval"]) == {"before", "after"}


@pytest.mark.slow  # CI time; CI keeps the SIGTERM, planted-pickle and refusal tests
def test_unreadable_trainer_state_falls_back_to_the_previous_checkpoint(pair, full, tmp_path):
    out = tmp_path / "torn"
    assert train(pair, out, **{"run.exit_interval": 2, "run.save_every": 1})[0] == "ok"
    (out / "checkpoints" / "step_000001" / "trainer_state.json").write_text("")  # torn write
    assert train(pair, out, **{"run.resume": "true", "run.save_every": 1})[0] == "ok"
    assert steps(out) == [0, 1, 2, 3] and losses(out) == losses(full)


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_planted_pickles_are_refused(pair, full, tmp_path):
    marker = tmp_path / "PWNED"
    out = tmp_path / "planted"
    shutil.copytree(full, out)
    (out / "summary.json").unlink()  # a finished run is not reloaded: make resume read the checkpoint
    ckpt = out / "checkpoints" / "step_000003"
    genuine = torch.load(ckpt / "optim_rank00000.pt", weights_only=True)  # the real file loads safely
    assert "optimizer" in genuine
    with open(ckpt / "optim_rank00000.pt", "wb") as f:
        pickle.dump({"optimizer": _Payload(marker)}, f)
    write_manifest(ckpt)  # a consistent forgery: the manifest alone would only fall back to step 2
    code, _, err = cli(pair, out, **{"run.resume": "true"})
    assert code == 2 and not marker.exists()
    one_error_line(err, "refusing to load")
    # A dist_checkpointing .metadata, as a teacher checkpoint and through the converter.
    teacher = tmp_path / "teacher_ckpt"
    shutil.copytree(full / "checkpoints" / "step_000003", teacher)
    with open(teacher / "model" / ".metadata", "wb") as f:
        pickle.dump(_Payload(marker), f)
    write_manifest(teacher)
    code, _, err = cli(pair, tmp_path / "t", **{"teacher.path": teacher})
    assert code == 2 and not marker.exists()
    one_error_line(err, ".metadata")
    res = subprocess.run([sys.executable, "-m", "megatron_tip.convert", "megatron-to-hf", "--megatron-dir",
                          str(teacher), "--out", str(tmp_path / "hf")], capture_output=True, text=True,
                         timeout=300, cwd=REPO)
    assert res.returncode == 2 and "refusing to load" in res.stderr and not marker.exists()
    assert not (tmp_path / "hf").exists()



@pytest.mark.slow  # CI time; CI keeps the SIGTERM, planted-pickle and refusal tests
def test_a_run_that_skips_too_many_steps_fails(pair, tmp_path):
    root, teacher, student = pair
    bad = poison_teacher(teacher, tmp_path / "bad_teacher")
    code, out, err = cli(pair, tmp_path / "skip", **{"teacher.path": bad, "train.max_skipped_fraction": 0.5})
    assert code == 1
    one_error_line(err, "steps skipped")
    assert "skipped (non-finite token statistics)" in out
    assert not (tmp_path / "skip" / "checkpoints").exists()  # no untrained checkpoint


def test_sigterm_mid_run_saves_and_resume_gives_the_same_losses(pair, full, tmp_path):
    root, teacher, student = pair
    out = tmp_path / "preempted"
    argv = overrides(root, teacher, student, **{"train.steps": 4, "run.out_dir": out})
    cmd = [sys.executable, "-m", "megatron_tip.train", "--config", str(REPO / "tests/helpers/empty.yaml"), *argv]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 1:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # during step 1 (or between steps): finish it, save, exit 75
    stdout, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 75, stderr[-3000:]
    assert "preempted at step" in stdout and "checkpoint saved" in stdout
    assert stdout.count("TIP step plan: preflight") == 1 and "peak" in stdout  # the planner, once, before step 0
    stopped = steps(out)
    assert stopped and stopped[-1] < 3
    assert train(pair, out, **{"run.resume": "auto"})[0] == "ok"
    assert steps(out) == [0, 1, 2, 3]
    assert losses(out) == losses(full)
