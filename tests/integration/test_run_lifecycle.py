"""A run's life in its directory, with real processes and real signals (issues #24, #25, #26):
one process per run directory (run.lock), a failed start claims nothing, evaluations and skip
counts survive a resume, a run is finished when its summary is written, kill -9 during a save
leaves no process behind, group signals during a save stop the run cleanly."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest

from megatron_tip.launch import run_distributed
from tests.helpers.paths import REPO
from tests.helpers.trainer_cases import PROMPTS, make_pair, overrides, poison_teacher, run_train_main

pytestmark = pytest.mark.timeout(900)
EMPTY = str(REPO / "tests/helpers/empty.yaml")
EVAL = {"eval.prompts": PROMPTS, "eval.limit": 2}


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("pair")
    return (root,) + make_pair(root)


def _argv(pair, out, **kw):
    root, teacher, student = pair
    return ["--config", EMPTY, *overrides(root, teacher, student, **{"train.steps": 4, "run.out_dir": out, **kw})]



def train(pair, out, **kw):
    """One in-process CLI run (a forked rank): ("ok", result) or ("exit", code)."""
    return run_distributed(run_train_main, 1, _argv(pair, out, **kw), timeout=400)[0]


def start(pair, out, **kw) -> subprocess.Popen:
    """The real CLI in its own session (so its process group and any child it leaves can be found)."""
    return subprocess.Popen([sys.executable, "-m", "megatron_tip.train", *_argv(pair, out, **kw)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, start_new_session=True)


def cli(pair, out, **kw):
    """The real CLI to its end: (exit code, stdout with stderr merged in, as a terminal shows them)."""
    res = subprocess.run([sys.executable, "-m", "megatron_tip.train", *_argv(pair, out, **kw)],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=400, cwd=REPO,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    return res.returncode, res.stdout


def wait_for(condition, proc: subprocess.Popen, *, timeout: float = 300, poll: float = 0.002) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"exited early ({proc.returncode}): {proc.stderr.read()[-3000:]}"
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(poll)


def session_processes(sid: int) -> list[psutil.Process]:
    """Live processes of session ``sid`` (the trainer and everything it started, orphans included)."""
    out = []
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == sid and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except (ProcessLookupError, psutil.NoSuchProcess, PermissionError):
            continue
    return out


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def error_lines(text: str) -> list[str]:
    return [ln for ln in text.strip().splitlines() if ln.startswith("error: ")]


def test_a_second_process_on_a_live_run_dir_is_refused_until_the_first_dies(pair, tmp_path):
    out = tmp_path / "locked"
    first = start(pair, out, **{"train.steps": 400, "run.resume": "auto"})
    try:
        wait_for(lambda: (out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").read_text().strip(), first,
                 poll=0.05)
        code, text = cli(pair, out, **{"train.steps": 400, "run.resume": "auto"})
        assert first.poll() is None, "the first run ended before the second was checked"
        lines = error_lines(text)
        assert code == 2 and len(lines) == 1, text[-3000:]
        assert f"PID {first.pid} on host {socket.gethostname()}" in lines[0] and "Traceback" not in text
    finally:
        os.kill(first.pid, signal.SIGKILL)
        first.communicate(timeout=60)
    # The kernel dropped the dead run's lock: the same command takes the directory.
    assert train(pair, out, **{"train.steps": 400, "run.resume": "auto", "run.exit_interval": 1})[0] == "ok"


def test_a_failed_start_leaves_the_run_dir_free_for_the_corrected_command(pair, tmp_path):
    out = tmp_path / "typo"
    missing = tmp_path / "no_such_prompts.jsonl"
    code, text = cli(pair, out, **{"data.prompts": missing, **EVAL})
    assert code == 2 and len(error_lines(text)) == 1 and str(missing) in text, text[-3000:]
    assert not (out / "run.json").exists()
    code, text = cli(pair, out, **{"train.steps": 2, **EVAL})  # the corrected command, run.resume=false
    assert code == 0, text[-3000:]
    # The console: the bar's first line does not swallow the evaluation line; a short summary ends it.
    lines = text.splitlines()
    assert any(ln.startswith("held-out before: ") for ln in lines), text[-3000:]
    assert any(ln.startswith("held-out accuracy, greedy (n=2): ") and "% -> " in ln for ln in lines), text[-2000:]
    assert not any(ln.lstrip().startswith("{") for ln in lines) and "summary.json" in lines[-1]
    # The same with run.resume=auto: the failed start's config must not be "another run".
    out = tmp_path / "typo_auto"
    assert train(pair, out, **{"data.prompts": missing, "run.resume": "auto"}) == ("exit", 2)
    assert train(pair, out, **{"train.steps": 2, "run.resume": "auto"})[0] == "ok"


def test_kill_9_during_the_after_eval_then_resume_runs_it_and_writes_the_summary(pair, tmp_path):
    out = tmp_path / "after"
    kw = {"train.steps": 2, "eval.prompts": PROMPTS, "eval.limit": 16}
    proc = start(pair, out, **kw)
    final = out / "checkpoints" / "step_000001" / "trainer_state.json"
    wait_for(final.is_file, proc)
    os.kill(proc.pid, signal.SIGKILL)  # in the "after" evaluation (16 prompts x 2 settings)
    proc.communicate(timeout=60)
    assert not (out / "summary.json").exists(), "the after-eval finished before the kill; raise eval.limit"
    before = json.loads((out / "evals.json").read_text())["before"]
    status, result = train(pair, out, **{**kw, "run.resume": "auto"})
    assert status == "ok"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval"]["before"] == before and set(summary["eval"]) == {"before", "after"}
    assert summary["final"]["step"] == 1 and result["after_eval_n"] == 16
    assert train(pair, out, **{**kw, "run.resume": "auto"})[1]["after_eval_n"] == 16  # now finished



def test_skipped_steps_count_across_a_resume(pair, tmp_path):
    root, teacher, student = pair
    bad = poison_teacher(teacher, tmp_path / "bad_teacher")
    out = tmp_path / "skips"
    kw = {"teacher.path": bad, "train.max_skipped_fraction": 0.75}  # fail once more than 3 of 4 are skipped
    assert train(pair, out, **kw, **{"run.exit_interval": 2})[0] == "ok"  # steps 0, 1 skipped
    assert train(pair, out, **kw, **{"run.resume": "auto"}) == ("exit", 1)  # steps 2, 3: the 4th skip fails
    assert [m["skipped_steps"] for m in metrics(out)] == [1.0, 2.0, 3.0, 4.0]


def _newest_step(out) -> int:
    done = [p for p in (out / "checkpoints").glob("step_*") if (p / "trainer_state.json").is_file()]
    return max(json.loads((p / "trainer_state.json").read_text())["step"] for p in done)


def test_kill_9_during_a_save_leaves_no_process_behind(pair, tmp_path):
    for attempt, delay in enumerate((0.02, 0.035, 0.05)):
        out = tmp_path / f"kill{attempt}"
        proc = start(pair, out, **{"run.save_every": 1})
        wait_for(lambda: any((out / "checkpoints").glob(".step_*.tmp/model/__0_*.distcp")), proc)
        time.sleep(delay)
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=60)
        deadline = time.monotonic() + 5
        while session_processes(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = [(p.pid, p.ppid(), " ".join(p.cmdline())[:120]) for p in session_processes(proc.pid)]
        for p in session_processes(proc.pid):
            p.kill()
        assert not left, f"attempt {attempt}: processes of the killed run survive: {left}"


@pytest.fixture(scope="module")
def reference(pair, tmp_path_factory):
    """Losses of an uninterrupted 4-step run (with the held-out evaluation, as the signalled runs)."""
    out = tmp_path_factory.mktemp("reference") / "run"
    assert train(pair, out, **EVAL)[0] == "ok"
    return [m["loss"] for m in metrics(out)]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP], ids=lambda s: s.name)
def test_a_group_signal_during_a_save_stops_cleanly_and_resumes_exactly(pair, reference, tmp_path, sig):
    out = tmp_path / "group"
    proc = start(pair, out, **{"run.save_every": 1, **EVAL})
    wait_for(lambda: any((out / "checkpoints").glob(".step_*.tmp")), proc)
    os.killpg(proc.pid, sig)  # everything in the run's process group, as a terminal or scheduler does
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 75, stderr[-3000:]
    assert "preempted at step" in stdout and "Traceback" not in stderr, stderr[-3000:]
    assert not session_processes(proc.pid)
    assert _newest_step(out) == metrics(out)[-1]["step"] < 3  # the checkpoint of the last step run
    before = json.loads((out / "evals.json").read_text())["before"]
    assert train(pair, out, **{"run.resume": "auto", **EVAL})[0] == "ok"
    assert [m["loss"] for m in metrics(out)] == reference
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval"]["before"] == before and "after" in summary["eval"]
