"""`python -m megatron_tip.train` with a wrong path: one `error:` line naming the key, exit 2, before any
process group, run directory or model exists, never a hub lookup; the corrected command then runs."""
import os
import subprocess
import sys

import pytest

from tests.helpers.paths import REPO

pytestmark = pytest.mark.timeout(600)
TINY = str(REPO / "examples" / "configs" / "tiny_cpu.yaml")
SMOKE = ["train.steps=1", "optim.warmup_steps=0", "train.prompts_per_step=4", "eval.prompts=", "log.tensorboard=false",
         "log.preflight=false", "rollout.max_new_tokens=8"]


def _train(*overrides, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "0"}  # a hub lookup would be attempted, not faked
    return subprocess.run([sys.executable, "-m", "megatron_tip.train", "--config", TINY, *overrides], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("key", ["student.path", "teacher.path", "data.prompts", "eval.prompts"])
def test_a_wrong_path_is_one_line_exit_2_and_the_fixed_command_runs(key, tmp_path):
    out = tmp_path / "run"
    wrong = str(tmp_path / "no" / "such" / key.replace(".", "_"))
    res = _train(f"{key}={wrong}", f"run.out_dir={out}", *SMOKE[:-4] if key == "eval.prompts" else SMOKE, timeout=120)
    err = res.stderr.strip().splitlines()
    assert res.returncode == 2, res.stderr[-2000:]
    assert err[-1].startswith(f"error: {key}={wrong!r}: no such ") and "Traceback" not in res.stderr, err[-5:]
    assert not [line for line in err if line.startswith("error")][:-1]  # one error line
    assert not out.exists()  # checked before the run directory is claimed: nothing to unlock
    if key == "student.path":  # the same command with the path fixed trains (no run.json left to refuse it)
        ok = _train(f"run.out_dir={out}", *SMOKE)
        assert ok.returncode == 0, ok.stderr[-3000:]
        assert (out / "summary.json").is_file()
