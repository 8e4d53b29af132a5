"""CI variant of tests/integration/test_gpu_script.py: the GPU script parses and its checks module imports."""
import subprocess
import sys

from tests.helpers.paths import REPO


def test_gpu_script_is_valid_bash_and_checks_compile():
    assert subprocess.run(["bash", "-n", "tests/gpu/run.sh"], cwd=REPO).returncode == 0
    res = subprocess.run([sys.executable, "-m", "py_compile", "tests/gpu/checks.py"], cwd=REPO,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
