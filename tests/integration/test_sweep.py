"""The scaling-study tools on a reduced grid: CSV rows, resumability, PNG plots."""
import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.paths import REPO
ENV = {**os.environ, "PYTHONPATH": str(REPO)}  # this checkout's code, whatever is pip-installed
pytestmark = [pytest.mark.timeout(600), pytest.mark.slow]  # ~75 s: the sweep tool end to end


def _sweep(out: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "tools/sweep_tip.py", "--out", str(out), "--grid", "reduced", "--steps", "2",
           "--eval-limit", "4"]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=550, env=ENV)


def test_reduced_sweep_csv_resume_and_plots(tmp_path):
    res = _sweep(tmp_path)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    rows = list(csv.DictReader((tmp_path / "results.csv").open()))
    assert [(r["policy"], float(r["keep_ratio"])) for r in rows] == [("all", 1.0), ("soft_or", 0.5)]
    for r in rows:
        assert 0 <= float(r["acc_after"]) <= 1 and float(r["peak_memory_gb"]) > 0
        assert abs(sum(float(r[f"frac_q{i}"]) for i in range(1, 5)) - 1) < 1e-6
    assert float(rows[1]["mean_kept_ratio"]) <= 0.5 < float(rows[0]["mean_kept_ratio"])
    for r in rows:  # issue #18 columns: all four kept shares, Q3 under forward KL, squash of δ̂, Q3 lift
        assert (r["normalization"], r["weighting"]) == ("minmax", "none")
        assert abs(sum(float(r[f"kept_frac_q{i}"]) for i in range(1, 5)) - 1) < 1e-6
        assert 0 <= float(r["frac_q3_fkl"]) <= 1 and 0 <= float(r["dhat_median"]) <= 1
    assert float(rows[0]["q3_lift"]) == 1.0  # all tokens kept: Q3's kept share is its base rate
    # Resumable: a second call finds both rows done and runs nothing.
    again = _sweep(tmp_path)
    assert again.returncode == 0 and len(list(csv.DictReader((tmp_path / "results.csv").open()))) == 2
    assert not (tmp_path / "logs").joinpath("x").exists() and "acc" not in again.stderr.split("sweep")[-1]
    plot = subprocess.run([sys.executable, "tools/plot_sweep.py", "--csv", str(tmp_path / "results.csv")],
                          cwd=REPO, capture_output=True, text=True, timeout=120, env=ENV)
    assert plot.returncode == 0, plot.stderr[-2000:]
    for name in ("accuracy_vs_keep_ratio.png", "entropy_divergence_hist.png"):
        png = tmp_path / "plots" / name
        assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
