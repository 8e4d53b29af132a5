"""tests/gpu/run.sh is valid bash and its Python checks run end to end on the CPU (--dry-run)."""
import json
import os
import subprocess

import pytest

from tests.helpers.paths import REPO

pytestmark = pytest.mark.timeout(600)


@pytest.mark.slow  # ~2-4 min on 2 cores: 2-step training runs (2 ranks for the own-layout teacher); tests/unit/test_gpu_script_syntax.py is the CI variant
def test_gpu_script_parses_and_dry_runs():
    assert subprocess.run(["bash", "-n", "tests/gpu/run.sh"], cwd=REPO).returncode == 0
    res = subprocess.run(["bash", "tests/gpu/run.sh", "--dry-run"], cwd=REPO, capture_output=True, text=True,
                         timeout=540, env={**os.environ, "PYTHONPATH": str(REPO)})  # this checkout's code
    assert res.returncode == 0, res.stderr[-3000:]
    checks = {}
    for line in res.stdout.splitlines():
        if line.startswith("{"):
            row = json.loads(line)
            checks[row["check"]] = row
    assert set(checks) == {"ops_float32", "ops_bfloat16", "fused_linear_bfloat16", "kv_decoder", "train_megatron",
                           "teacher_own_layout", "teacher_offload", "thd"}
    assert all(c["ok"] for c in checks.values()), checks
    assert res.stdout.strip().splitlines()[-1].startswith("SUMMARY PASS")
