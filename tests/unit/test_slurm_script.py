"""slurm/train_qwen3.sh without a cluster: srun and scontrol are stubs that record their calls, so
the launch line (processes per node, threads, rendezvous, run directory) and the requeue decision
are checked in milliseconds. The real cluster runs are in tests/integration/test_slurm.py."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "slurm" / "train_qwen3.sh"

# srun: record argv and the launch environment; the training step (no --overlap) optionally sleeps
# STUB_SLEEP s, writes a complete checkpoint and exits STUB_RC.
SRUN = r"""#!/bin/bash
python3 - "$@" <<'EOF'
import json, os, sys
keys = ("OMP_NUM_THREADS", "MASTER_ADDR", "MASTER_PORT", "PET_SIGNALS_TO_HANDLE")
with open(os.environ["STUB_LOG"], "a") as f:
    f.write(json.dumps({"srun": sys.argv[1:], "env": {k: os.environ.get(k) for k in keys}}) + "\n")
EOF
[[ " $* " == *" --overlap "* ]] && exit 0
sleep "${STUB_SLEEP:-0}"
if [[ -n ${STUB_NEW_CKPT:-} ]]; then
  mkdir -p "$STUB_NEW_CKPT" && echo '{}' > "$STUB_NEW_CKPT/trainer_state.json"
fi
exit "${STUB_RC:-0}"
"""
SCONTROL = r"""#!/bin/bash
case "$1 $2" in
  "show hostnames") echo node-a; echo node-b ;;
  "show node") echo "NodeName=node-a Arch=x86_64 NodeAddr=10.1.2.3 NodeHostName=node-a" ;;
  "show job") echo "JobId=$4 JobName=tip JobState=${STUB_STATE:-RUNNING} Reason=None" ;;
  requeue*) echo "requeue $2" >> "$STUB_LOG" ;;
  *) echo "unexpected scontrol $*" >&2; exit 1 ;;
esac
"""


def _run(tmp_path: Path, *args: str, **env: str) -> tuple[subprocess.CompletedProcess, list]:
    """Run the script as Slurm would on the batch node; returns the process and the stub calls."""
    full_env, log = _env(tmp_path, **env)
    proc = subprocess.run(["bash", str(SCRIPT), *args], cwd=REPO, env=full_env,
                          capture_output=True, text=True, timeout=60)
    return proc, _calls(log)


def _torchrun_args(srun_argv: list[str]) -> list[str]:
    return srun_argv[srun_argv.index("torchrun", srun_argv.index("-c") + 2):]


def _env(tmp_path: Path, **env: str) -> tuple[dict, Path]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, text in (("srun", SRUN), ("scontrol", SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    log = tmp_path / "calls.jsonl"
    log.unlink(missing_ok=True)
    base = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "HOME": str(tmp_path),
            "STUB_LOG": str(log), "RUN_ROOT": str(tmp_path / "runs"), "CONFIG": "examples/configs/tiny_cpu.yaml",
            "SLURM_JOB_ID": "123", "SLURM_JOB_NAME": "tip", "SLURM_JOB_NODELIST": "node-[a-b]",
            "SLURM_NNODES": "2", "SLURM_CPUS_PER_TASK": "16"}
    return {**base, **env}, log


def _calls(log: Path) -> list:
    return [json.loads(line) if line.startswith("{") else line.strip()
            for line in log.read_text().splitlines()] if log.exists() else []


def _flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_gpu_launch_line(tmp_path):
    proc, calls = _run(tmp_path, "selection.keep_ratio=0.2", SLURM_GPUS_PER_NODE="h100:8")
    assert proc.returncode == 0, proc.stderr
    (call,) = calls
    srun = call["srun"]
    assert "--cpus-per-task=16" in srun and "--ntasks-per-node=1" in srun and "--nodes=2" in srun
    # torchrun runs behind a wrapper that ignores USR1/TERM (training processes handle them) and
    # records torchrun's PID in a node-local file.
    assert srun[srun.index("-c") + 1].startswith('trap "" USR1 TERM; "$@" & echo $! > "$0-$SLURM_PROCID')
    assert srun[srun.index("-c") + 2] == "/tmp/megatron_tip-123.0"   # job id . restart count
    tr = _torchrun_args(srun)
    assert _flag(tr, "--nproc-per-node") == "8"          # typed request h100:8
    assert _flag(tr, "--nnodes") == "2"
    assert _flag(tr, "--rdzv-endpoint") == "10.1.2.3:29623"   # NodeAddr of the first node, 29500 + 123
    assert tr[-3:] == [f"run.out_dir={tmp_path}/runs/tip-123", "run.resume=auto", "selection.keep_ratio=0.2"]
    assert call["env"] == {"OMP_NUM_THREADS": "2", "MASTER_ADDR": "10.1.2.3", "MASTER_PORT": "29623",
                           "PET_SIGNALS_TO_HANDLE": "SIGINT,SIGHUP,SIGQUIT"}


@pytest.mark.parametrize("env, nproc, threads", [
    ({"SLURM_GPUS_ON_NODE": "4", "SLURM_GPUS_PER_NODE": "h100:8"}, "4", "4"),  # Slurm's per-node count wins
    ({"SLURM_GPUS_PER_NODE": "a100:2,h100:2"}, "4", "4"),
    ({"SLURM_GPUS_PER_NODE": "0"}, "1", "16"),                               # CPU: one process
    ({}, "1", "16"),
    ({"NPROC_PER_NODE": "3", "SLURM_GPUS_PER_NODE": "8"}, "3", "5"),
    ({"OMP_NUM_THREADS": "7", "SLURM_GPUS_PER_NODE": "8"}, "8", "7"),        # a set value is kept
])
def test_processes_and_threads(tmp_path, env, nproc, threads):
    proc, calls = _run(tmp_path, **env)
    assert proc.returncode == 0, proc.stderr
    assert _flag(_torchrun_args(calls[0]["srun"]), "--nproc-per-node") == nproc
    assert calls[0]["env"]["OMP_NUM_THREADS"] == threads
    assert ("no GPUs allocated: 1 process per node on the CPU" in proc.stdout) == (nproc == "1")


def test_bad_nproc_is_refused(tmp_path):
    proc, calls = _run(tmp_path, NPROC_PER_NODE="eight")
    assert proc.returncode == 2 and calls == []
    assert "NPROC_PER_NODE=eight must be a positive integer" in proc.stderr


def test_run_name_and_missing_config(tmp_path):
    proc, calls = _run(tmp_path, RUN_NAME="earlier-run")
    assert f"run.out_dir={tmp_path}/runs/earlier-run" in calls[0]["srun"]
    proc, calls = _run(tmp_path, CONFIG="nope.yaml")
    assert proc.returncode == 2 and calls == [] and "CONFIG=nope.yaml not found" in proc.stderr


@pytest.mark.parametrize("case, env, requeued, rc", [
    ("progress", {"STUB_RC": "1", "NEW": "step_000004"}, True, 0),
    ("finished", {"STUB_RC": "0", "NEW": "step_000004"}, False, 0),
    ("no progress", {"STUB_RC": "1"}, False, 1),
    ("cancelled", {"STUB_RC": "1", "NEW": "step_000004", "STUB_STATE": "COMPLETING"}, False, 1),
    ("cap", {"STUB_RC": "1", "NEW": "step_000004", "SLURM_RESTART_COUNT": "2", "MAX_REQUEUES": "2"}, False, 1),
])
def test_requeue_decision(tmp_path, case, env, requeued, rc):
    ckpts = tmp_path / "runs" / "tip-123" / "checkpoints"
    (ckpts / "step_000001").mkdir(parents=True)
    (ckpts / "step_000001" / "trainer_state.json").write_text("{}")
    (ckpts / "step_000009").mkdir()            # incomplete (no marker): not counted
    env = dict(env)
    if "NEW" in env:
        env["STUB_NEW_CKPT"] = str(ckpts / env.pop("NEW"))
    proc, calls = _run(tmp_path, **env)
    assert proc.returncode == rc, (case, proc.stdout, proc.stderr)
    assert ("requeue 123" in calls) == requeued, (case, proc.stdout)
    assert "newest checkpoint=1" in proc.stdout


def test_usr1_reaches_only_the_training_processes(tmp_path):
    """USR1 to the batch script: a second step (srun --overlap, every node) signals torchrun's
    children from the PID files; srun itself is not signalled (it would signal every process)."""
    env, log = _env(tmp_path, STUB_SLEEP="3", STUB_RC="75")
    proc = subprocess.Popen(["bash", str(SCRIPT)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not _calls(log):          # the training step has started
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=60)
    train, stop = _calls(log)[:2]
    assert "--overlap" not in train["srun"]
    argv = stop["srun"]
    assert argv[:4] == ["--overlap", "--nodes=2", "--ntasks-per-node=1", "bash"]
    assert 'pkill -USR1 -P "$p"' in argv[5] and argv[6] == "/tmp/megatron_tip-123.0"
    # The same code, run here against a stand-in torchrun (a shell with two children): exactly the
    # children get USR1, the parent does not; with pkill and with only /proc (no procps); a PID file
    # whose process is not a torchrun (left by a killed attempt, PID reused) is ignored.
    only_cat = tmp_path / "only_cat"
    only_cat.mkdir()
    (only_cat / "cat").symlink_to(shutil.which("cat"))
    for path in (os.environ["PATH"], str(only_cat)):
        fake = subprocess.Popen(["bash", "-c", "trap 'echo parent-signalled' USR1; for i in 1 2; do "
                                 "(trap 'echo child-signalled; kill $s; exit 0' USR1; sleep 30 & s=$!; "
                                 "echo ready; wait) & done; wait", "torchrun-stand-in"],
                                stdout=subprocess.PIPE, text=True)
        other = subprocess.Popen(["bash", "-c", "sleep 30 & wait", "not-a-launcher"])
        assert [fake.stdout.readline().strip() for _ in range(2)] == ["ready", "ready"]
        (tmp_path / "x-0.torchrun.pid").write_text(f"{fake.pid}\n")
        (tmp_path / "x-1.torchrun.pid").write_text(f"{other.pid}\n")
        subprocess.run([shutil.which("bash"), "-c", argv[5], str(tmp_path / "x")], env={"PATH": path},
                       check=True, timeout=30)
        out_fake, _ = fake.communicate(timeout=30)
        assert out_fake.split() == ["child-signalled", "child-signalled"], (path, out_fake)
        assert other.poll() is None          # its sleep child was not signalled either
        subprocess.run(["pkill", "-P", str(other.pid)])
        other.wait(timeout=30)
    assert "SIGUSR1: asking the training processes to save a checkpoint and stop" in out
    assert "training stopped (srun exit 75, SIGUSR1)" in out and proc.returncode == 75, (out, err)
