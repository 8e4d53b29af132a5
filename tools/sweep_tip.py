"""Token-budget scaling study on the CPU toy: policy x keep ratio (x student size), fixed seeds.

Each grid point is one `python -m megatron_tip.train` run in its own process (so peak memory
is that run's own); the CSV gets one row per finished run and finished rows are skipped on
the next call, so an interrupted sweep resumes where it stopped.

    python tools/sweep_tip.py --out runs/sweep --jobs 2            # full grid (~20 min on 2 cores)
    python tools/sweep_tip.py --out /tmp/s --grid reduced --steps 2 --eval-limit 8   # smoke
    python tools/plot_sweep.py --csv runs/sweep/results.csv --out runs/sweep/plots
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "examples" / "configs" / "tiny_cpu.yaml"
FIELDS = ["name", "policy", "score", "keep_ratio", "student", "seed", "steps", "acc_before", "acc_after",
          "greedy_before", "greedy_after",
          "final_loss", "mean_kept_tokens", "mean_kept_ratio", "frac_q1", "frac_q2", "frac_q3", "frac_q4",
          "kept_frac_q3", "peak_memory_gb", "train_tokens_per_s", "step_time_s", "wall_s"]

# (name, overrides): the paper's Tables 3-6 and 8 on the toy.
POLICIES = {
    "all": {"selection.policy": "all"},
    "entropy_sampling": {"selection.policy": "entropy_sampling"},
    "soft_or": {"selection.policy": "topk", "selection.score": "soft_or"},
    "q3": {"selection.policy": "topk", "selection.score": "q3"},
    "random": {"selection.policy": "random"},
    "soft_or_bottom": {"selection.policy": "bottomk", "selection.score": "soft_or"},
}


def grid(kind: str) -> list[tuple[str, float]]:
    """(policy, keep ratio) points; 'all' only at 1.0, the bottom-k ablation at 0.5 (Table 6)."""
    if kind == "reduced":
        return [("all", 1.0), ("soft_or", 0.5)]
    pts = [("all", 1.0)]
    for rho in (0.5, 0.2, 0.1):
        pts += [(p, rho) for p in ("entropy_sampling", "soft_or", "q3", "random")]
    return pts + [("soft_or_bottom", 0.5)]


def point_name(policy: str, rho: float, args) -> str:
    return f"{policy}_r{rho:g}_{args.student_tag}_s{args.seed}"


def run_point(policy: str, rho: float, *, args, out: Path, baseline: dict | None) -> dict:
    name = point_name(policy, rho, args)
    run_dir = out / "runs" / name
    ov = {**POLICIES[policy], "selection.keep_ratio": rho, "train.seed": args.seed,
          "selection.seed": args.seed, "train.steps": args.steps, "run.out_dir": run_dir,
          "eval.limit": args.eval_limit, "run.save_every": 0, "log.tensorboard": "false",
          "log.dump_token_stats": "true", "optim.warmup_steps": min(2, args.steps - 1),
          "eval.before": "false" if baseline else "true"}  # the untrained student once
    if args.student:
        ov["student.path"] = args.student
    cmd = [sys.executable, "-m", "megatron_tip.train", "--config", str(CONFIG),
           *[f"{k}={v}" for k, v in ov.items()]]
    t0 = time.time()
    log = (out / "logs").joinpath(f"{name}.log")
    log.parent.mkdir(parents=True, exist_ok=True)
    # One run per core: torch's default thread count oversubscribes the cores when runs overlap.
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    with log.open("w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, env=env).returncode
    if rc != 0:
        raise RuntimeError(f"run {name} failed (exit {rc}); see {log}")
    summary = json.loads((run_dir / "summary.json").read_text())
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in steps if "skipped" not in m]
    mean = lambda k: statistics.fmean(m[k] for m in steps if m.get(k) is not None)  # noqa: E731
    ev = summary.get("eval", {})
    before = baseline or ev.get("before", {})
    return {
        "name": name, "policy": policy, "score": POLICIES[policy].get("selection.score", ""),
        "keep_ratio": rho, "student": args.student_tag, "seed": args.seed, "steps": args.steps,
        "acc_before": before.get("eval_acc_T1"), "acc_after": ev.get("after", {}).get("eval_acc_T1"),
        "greedy_before": before.get("eval_acc_greedy"), "greedy_after": ev.get("after", {}).get("eval_acc_greedy"),
        "final_loss": steps[-1]["loss"], "mean_kept_tokens": mean("n_kept"), "mean_kept_ratio": mean("kept_ratio"),
        **{f"frac_q{i}": mean(f"frac_q{i}") for i in range(1, 5)}, "kept_frac_q3": mean("kept_frac_q3"),
        "peak_memory_gb": max(m["peak_memory_gb"] for m in steps),
        "train_tokens_per_s": mean("train_tokens_per_s"),
        "step_time_s": mean("time_train_s") + mean("time_score_s") + mean("time_rollout_s"),
        "wall_s": round(time.time() - t0, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--grid", choices=("full", "reduced"), default="full")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--eval-limit", type=int, default=200)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--student", default="", help="another student HF dir (model-size sweep)")
    ap.add_argument("--student-tag", default="toy_student")
    ap.add_argument("--jobs", type=int, default=1, help="runs at a time (one per core)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads per run (default: cores / jobs)")
    args = ap.parse_args()
    if args.jobs < 1:
        ap.error("--jobs must be >= 1")
    args.threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.csv"
    done, baseline = set(), None
    if path.is_file():
        with path.open() as f:
            rows = list(csv.DictReader(f))
        done = {row["name"] for row in rows}
        # The baseline is per student and seed (the eval's sampling seed follows train.seed).
        mine = [row for row in rows if row["student"] == args.student_tag and int(row["seed"]) == args.seed]
        if mine:
            baseline = {"eval_acc_T1": float(mine[0]["acc_before"]), "eval_acc_greedy": float(mine[0]["greedy_before"])}
    points = grid(args.grid)
    todo = [(pol, rho) for pol, rho in points if point_name(pol, rho, args) not in done]
    bar = tqdm(total=len(points), initial=len(points) - len(todo), desc="sweep")

    def record(row: dict) -> None:
        new = not path.is_file()
        with path.open("a", newline="") as f:  # one row per finished run: resumable
            w = csv.DictWriter(f, fieldnames=FIELDS)
            if new:
                w.writeheader()
            w.writerow(row)
        bar.update()
        tqdm.write(f"{row['name']}: acc {row['acc_before']:.3f} -> {row['acc_after']:.3f}, "
                   f"kept {row['mean_kept_ratio']:.2f}, peak {row['peak_memory_gb']:.2f} GB")

    if todo and baseline is None:  # the first run also evaluates the untrained student, once
        row = run_point(*todo.pop(0), args=args, out=out, baseline=None)
        baseline = {"eval_acc_T1": row["acc_before"], "eval_acc_greedy": row["greedy_before"]}
        record(row)
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = [pool.submit(run_point, pol, rho, args=args, out=out, baseline=baseline) for pol, rho in todo]
        failed = []
        for fut in as_completed(futures):
            try:
                record(fut.result())
            except RuntimeError as e:  # keep the other runs going; their rows still land
                failed.append(str(e))
                tqdm.write(f"FAILED: {e}")
    bar.close()
    if failed:
        sys.exit(f"{len(failed)} run(s) failed (rerun to retry only those):\n" + "\n".join(failed))
    print(f"results: {path}")


if __name__ == "__main__":
    main()
