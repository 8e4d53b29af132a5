"""`sbatch slurm/train_qwen3.sh` on a real Slurm cluster (CI: slurm/local_cluster.sh start), on the toy
pair with the README's CPU-test-partition overrides: a job runs to COMPLETED; a job preempted with USR1
saves, requeues itself, resumes and ends with the uninterrupted job's loss curve (USR1 to the batch
script, and USR1 to every process of the step while a save is in progress); two processes on one
node and one process on each of two nodes meet through the script's torchrun c10d rendezvous.
Skipped, with the reason, where no Slurm controller answers."""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[2]
SCRIPT = "slurm/train_qwen3.sh"
CONFIG = "examples/configs/tiny_cpu.yaml"
# The README's CPU-test-partition flags (the script's own #SBATCH lines ask for 8 GPUs and 96 CPUs).
CPU_FLAGS = ["--gpus-per-node=0", "--cpus-per-task=2", "--mem=4G", "--time=00:10:00"]
# Few, smaller steps; a checkpoint every 2 steps; no held-out eval.
TOY = ["train.prompts_per_step=8", "train.micro_batch_size=8", "run.save_every=2", "eval.prompts="]
# Generous waits (a 6-step job takes ~30 s on an idle 2-core machine, ~10x longer on a loaded one);
# each test stays under CI's 600 s pytest timeout.
JOB_WAIT_S = 360
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
         "DEADLINE", "PREEMPTED"}


def _cluster_problem() -> str | None:
    if shutil.which("sbatch") is None:
        return "Slurm is not installed (no sbatch on PATH); bring one up with: slurm/local_cluster.sh start"
    try:
        r = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return "sinfo did not answer in 20 s"
    if r.returncode != 0:
        return f"no Slurm controller answers ({(r.stderr or r.stdout).strip()}); slurm/local_cluster.sh start"
    usable = {n for n, s in (line.split() for line in r.stdout.splitlines()) if s.rstrip("*") in ("idle", "mixed")}
    return None if usable else f"no idle Slurm node: {r.stdout.strip()!r}"


def _nodes() -> int:
    r = subprocess.run(["sinfo", "-h", "-N", "-o", "%N"], capture_output=True, text=True, timeout=20)
    return len(set(r.stdout.split()))


@pytest.fixture(scope="module")
def cluster():
    problem = _cluster_problem()
    if problem:
        pytest.skip(problem)
    jobs: list[str] = []
    yield jobs
    for job in jobs:   # leave nothing running behind a failed test
        subprocess.run(["scancel", job], capture_output=True, timeout=20)


def _sbatch(jobs: list[str], *args: str, env: dict | None = None) -> str:
    # Jobs run this checkout's code. OMP_NUM_THREADS (conftest: 1) reaches the jobs as a set value;
    # the script's default from the allocation is covered in tests/unit/test_slurm_script.py.
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    r = subprocess.run(["sbatch", "--parsable", *args], cwd=REPO, env=full_env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, f"sbatch {' '.join(args)} failed: {r.stderr}"
    job = r.stdout.strip().split(";")[0]
    jobs.append(job)
    return job


def _job(job: str) -> dict:
    r = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True, timeout=20)
    return dict(kv.split("=", 1) for kv in r.stdout.split() if "=" in kv)


def _tail(log: Path, n: int = 60) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-n:]) if log.exists() else f"(no log {log})"


def _wait(job: str, log: Path, timeout: float) -> dict:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        info = _job(job)
        if info.get("JobState") in FINAL:
            return info
        time.sleep(1)
    subprocess.run(["scancel", job], capture_output=True, timeout=20)
    pytest.fail(f"job {job} not finished after {timeout:.0f} s (state {_job(job).get('JobState')}):\n{_tail(log)}")


def _complete_steps(run_dir: Path) -> list[int]:
    return sorted(int(p.parent.name.split("_")[1]) for p in run_dir.glob("checkpoints/step_*/trainer_state.json"))


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _check_finished(info: dict, log: Path, run_dir: Path, steps: int) -> list[float]:
    """COMPLETED, one finite loss per step 0..steps-1 (each once), the last step's checkpoint."""
    assert info["JobState"] == "COMPLETED", f"{info['JobState']} {info.get('ExitCode')}\n{_tail(log)}"
    rows = _metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(steps)), _tail(log)
    losses = [r["loss"] for r in rows]
    assert all(math.isfinite(x) for x in losses), losses
    assert _complete_steps(run_dir)[-1] == steps - 1
    assert (run_dir / "summary.json").is_file()
    return losses


@pytest.fixture(scope="module")
def uninterrupted(cluster, tmp_path_factory):
    """The README's CPU-test-partition command, 6 steps; the reference for the preemption test."""
    runs = tmp_path_factory.mktemp("slurm_runs")
    t0 = time.monotonic()
    job = _sbatch(cluster, "--job-name=tip-slurm-test", *CPU_FLAGS, f"--export=ALL,CONFIG={CONFIG}",
                  SCRIPT, "train.steps=6", *TOY, env={"RUN_ROOT": str(runs)})
    log = REPO / "logs" / f"tip-slurm-test-{job}.out"     # the script's default output path
    info = _wait(job, log, timeout=JOB_WAIT_S)
    yield {"job": job, "info": info, "log": log, "run_dir": runs / f"tip-slurm-test-{job}",
           "seconds": time.monotonic() - t0, "text": log.read_text(errors="replace") if log.exists() else ""}
    log.unlink(missing_ok=True)


def test_sbatch_runs_to_completed(uninterrupted):
    run_dir, log = uninterrupted["run_dir"], uninterrupted["log"]
    _check_finished(uninterrupted["info"], log, run_dir, steps=6)
    assert f"nodes=1 procs/node=1 threads={os.environ['OMP_NUM_THREADS']}" in uninterrupted["text"]
    assert int(uninterrupted["info"]["Restarts"]) == 0
    print(f"job {uninterrupted['job']}: COMPLETED in {uninterrupted['seconds']:.0f} s")


def test_usr1_saves_requeues_and_resumes_to_the_same_losses(cluster, uninterrupted, tmp_path):
    runs = tmp_path / "runs"
    log = tmp_path / "preempt.out"
    t0 = time.monotonic()
    job = _sbatch(cluster, "--job-name=tip-preempt", f"--output={log}", *CPU_FLAGS, SCRIPT, "train.steps=6", *TOY,
                  env={"RUN_ROOT": str(runs), "CONFIG": CONFIG})
    run_dir = runs / f"tip-preempt-{job}"
    end = time.monotonic() + 200
    while not _complete_steps(run_dir):
        assert _job(job).get("JobState") not in FINAL, f"ended before its first checkpoint:\n{_tail(log)}"
        assert time.monotonic() < end, f"no checkpoint after 200 s:\n{_tail(log)}"
        time.sleep(0.5)
    first = _complete_steps(run_dir)[0]
    # What Slurm does before the time limit (--signal=B:USR1@300): USR1 to the batch script.
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True, timeout=20)
    info = _wait(job, log, timeout=JOB_WAIT_S)
    text = log.read_text(errors="replace")
    losses = _check_finished(info, log, run_dir, steps=6)
    saved = re.search(r"preempted at step (\d+) \(SIGUSR1\): checkpoint saved to", text)
    assert saved, _tail(log)
    step = int(saved.group(1))
    assert first <= step < 5
    assert int(info["Restarts"]) == 1 and f"requeued job {job} (restart 1 of" in text
    # The requeued start names the checkpoint it resumes from.
    assert re.search(rf"job={job} restarts=1 .* newest checkpoint={step}\b", text), _tail(log)
    assert f"resuming from {run_dir}/checkpoints/step_{step:06d} (step {step})" in text, _tail(log)
    assert losses == [r["loss"] for r in _metrics(uninterrupted["run_dir"])]   # same seed: bit-identical
    print(f"job {job}: USR1 after checkpoint {first}, saved at step {step}, requeued, COMPLETED in "
          f"{time.monotonic() - t0:.0f} s")


def test_usr1_to_every_process_of_the_step_during_a_save_still_saves_and_resumes(cluster, uninterrupted, tmp_path):
    """`scancel --signal=USR1 JOB` (no --batch): Slurm signals every process of the job's steps (the
    srun wrapper, torchrun, the training process) while a checkpoint is being written. The training
    process's own handler decides: it completes the save, prints the preemption line and exits 75;
    the script requeues and the resumed job ends with the uninterrupted job's losses."""
    runs = tmp_path / "runs"
    log = tmp_path / "step_usr1.out"
    job = _sbatch(cluster, "--job-name=tip-step-usr1", f"--output={log}", *CPU_FLAGS, SCRIPT, "train.steps=6", *TOY,
                  "run.save_every=1", env={"RUN_ROOT": str(runs), "CONFIG": CONFIG})
    run_dir = runs / f"tip-step-usr1-{job}"
    end = time.monotonic() + 200
    while not any((run_dir / "checkpoints").glob(".step_*.tmp")):   # a save is in progress
        assert _job(job).get("JobState") not in FINAL, f"ended before its first save:\n{_tail(log)}"
        assert time.monotonic() < end, f"no save started after 200 s:\n{_tail(log)}"
        time.sleep(0.02)
    subprocess.run(["scancel", "--signal=USR1", job], check=True, timeout=20)
    info = _wait(job, log, timeout=JOB_WAIT_S)
    text = log.read_text(errors="replace")
    losses = _check_finished(info, log, run_dir, steps=6)
    saved = re.search(r"preempted at step (\d+) \(SIGUSR1\): checkpoint saved to", text)
    assert saved, _tail(log)
    # The training process exits 75 (torchrun reports that child exit with its own ChildFailedError
    # traceback); nothing of ours fails: no writer died under it (EOFError / BrokenPipeError before).
    assert "exitcode  : 75" in text, _tail(log)
    assert not re.search(r"EOFError|BrokenPipeError|File \".*megatron_tip/", text), _tail(log)
    step = int(saved.group(1))
    assert int(info["Restarts"]) == 1 and f"requeued job {job} (restart 1 of" in text, _tail(log)
    assert f"resuming from {run_dir}/checkpoints/step_{step:06d} (step {step})" in text, _tail(log)
    assert losses == [r["loss"] for r in _metrics(uninterrupted["run_dir"])]   # bit-identical to no preemption


def test_two_processes_on_one_node(cluster, tmp_path):
    runs, log = tmp_path / "runs", tmp_path / "tp2.out"
    t0 = time.monotonic()
    job = _sbatch(cluster, "--job-name=tip-tp2", f"--output={log}", *CPU_FLAGS, SCRIPT,
                  "train.steps=2", "optim.warmup_steps=1", "parallel.tensor_parallel=2", *TOY,
                  env={"RUN_ROOT": str(runs), "CONFIG": CONFIG, "NPROC_PER_NODE": "2"})
    info = _wait(job, log, timeout=JOB_WAIT_S)
    _check_finished(info, log, runs / f"tip-tp2-{job}", steps=2)   # TP=2 needs both ranks
    assert "nodes=1 procs/node=2 threads=1" in log.read_text()
    print(f"job {job}: 2 processes, TP=2, COMPLETED in {time.monotonic() - t0:.0f} s")


def test_two_nodes(cluster, tmp_path):
    if _nodes() < 2:
        pytest.skip("the cluster has one node (slurm/local_cluster.sh starts two by default)")
    runs, log = tmp_path / "runs", tmp_path / "2nodes.out"
    t0 = time.monotonic()
    job = _sbatch(cluster, "--job-name=tip-2nodes", "--nodes=2", f"--output={log}", *CPU_FLAGS, SCRIPT,
                  "train.steps=2", "optim.warmup_steps=1", "parallel.tensor_parallel=2", *TOY,
                  env={"RUN_ROOT": str(runs), "CONFIG": CONFIG})
    info = _wait(job, log, timeout=JOB_WAIT_S)
    _check_finished(info, log, runs / f"tip-2nodes-{job}", steps=2)
    hosts = subprocess.run(["scontrol", "show", "hostnames", info["NodeList"]], capture_output=True, text=True).stdout
    assert len(hosts.split()) == 2, info["NodeList"]
    assert "nodes=2 procs/node=1" in log.read_text()
    print(f"job {job}: 2 nodes ({info['NodeList']}), TP=2 across them, COMPLETED in {time.monotonic() - t0:.0f} s")
