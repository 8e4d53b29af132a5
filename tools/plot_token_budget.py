"""Plots of tools/bench_token_budget.py's JSON: memory and time vs keep ratio ρ.

- token_budget_cpu_measured.png: the scaled Qwen3-shaped pair on CPU, measured: whole-step peak
  and each phase's peak (live tensors), the planner's prediction, and CPU seconds per phase;
  with the fused output layer (the default), plus the unfused runs dashed where the JSON has them
- token_budget_qwen3_8b_4b_h100.png: the planner's projection for Qwen3-8B -> 4B on 8 x H100
  (per-phase memory and step-time split), with the paper's reported end-to-end peaks

    python tools/plot_token_budget.py --json docs/results/token_budget.json --out docs/results
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

# Paper, Table "Entropy sampling across model pairs": Peak Mem (GB, Qwen3) at 100/50/20/10%, 8 x H200.
PAPER_QWEN3_PEAK_GB = {1.0: 72.0, 0.5: 38.1, 0.2: 35.5, 0.1: 35.3}
PHASE_COLORS = {"rollout": "tab:green", "scoring": "tab:blue", "gradient": "tab:red", "optimizer": "tab:purple"}


def _labels(ax, *, ylabel: str, title: str) -> None:
    ax.set_xlabel("keep ratio ρ")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)
    ax.set_title(title)


def _memory_axis(ax, x: list[float], *, ylabel: str, title: str) -> None:
    """Log-scaled ρ axis with a tick per measured ρ, memory from 0."""
    ax.set_xscale("log")
    ax.set_xticks(x, [f"{v:g}" for v in x])
    ax.set_ylim(bottom=0)
    _labels(ax, ylabel=ylabel, title=title)


def _stacked_bars(ax, x: list[float], series: list[tuple[str, list[float], object]]) -> None:
    """One bar per ρ, stacked from (label, values, color or None) in order."""
    bottom = [0.0] * len(x)
    for key, vals, color in series:
        ax.bar([f"{v:g}" for v in x], vals, bottom=bottom, color=color, label=key)
        bottom = [u + v for u, v in zip(bottom, vals)]


def plot_measured(r: dict, out: Path) -> Path:
    rows = sorted([x for x in r["measured"] if x.get("fused", True)], key=lambda x: -x["rho"])
    off = sorted([x for x in r["measured"] if not x.get("fused", True)], key=lambda x: -x["rho"])
    x = [row["rho"] for row in rows]
    mib = 2**20
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    a.plot(x, [row["step_peak"] / mib for row in rows], marker="s", ms=9, color="k", lw=4, alpha=0.35,
           label="whole step (max)")
    for phase, color in PHASE_COLORS.items():
        a.plot(x, [(row["resident"] + row["phase_peaks"].get(phase, 0)) / mib for row in rows], marker="o",
               color=color, lw=1, label=f"{phase} phase")
    a.plot(x, [row["predicted"]["step_peak"] / mib for row in rows], ls="none", marker="x", ms=10, color="k",
           label="planner's prediction")
    if off:
        xo = [row["rho"] for row in off]
        a.plot(xo, [row["step_peak"] / mib for row in off], marker="s", color="k", ls="--", lw=1.5,
               label="whole step, unfused output layer")
        a.plot(xo, [(row["resident"] + row["phase_peaks"].get("gradient", 0)) / mib for row in off], marker="o",
               color="tab:red", ls="--", lw=1, label="gradient phase, unfused")
    _memory_axis(a, x, ylabel="peak live tensors (MiB)",
                 title="memory (measured, CPU; fused output layer unless dashed)")
    _stacked_bars(b, x, [(key, [row["cpu_s"].get(key, 0.0) for row in rows], color)
                         for key, color in (("rollout", "tab:green"), ("scoring", "tab:blue"),
                                            ("selection", "tab:gray"), ("gradient", "tab:red"),
                                            ("optimizer", "tab:purple"))])
    if off:
        labels = [f"{v:g}" for v in x]
        b.plot([labels[x.index(row["rho"])] for row in off if row["rho"] in x], [row["cpu_s"]["step"] for row in off
               if row["rho"] in x], ls="none", marker="_", ms=30, mew=2, color="k", label="step, unfused")
    _labels(b, ylabel="CPU seconds per step", title="time (measured, CPU, 1 thread; fused output layer)")
    s, t = r["student"], r["teacher"]
    sh = rows[0]["shapes"]
    fig.suptitle(f"Whole TIP step vs ρ: Qwen3-shaped student h{s['hidden']} L{s['layers']} / teacher "
                 f"h{t['hidden']} L{t['layers']}, V={r['vocab']:,}, {sh['rollouts']} x {sh['seq_len']} tokens",
                 fontsize=10)
    fig.tight_layout()
    path = out / "token_budget_cpu_measured.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_projection(r: dict, out: Path) -> Path:
    rows = sorted(r["projection"], key=lambda x: -x["rho"])
    x = [row["rho"] for row in rows]
    gib = 2**30
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    a.plot(x, [row["step_peak"] / gib for row in rows], marker="s", ms=9, color="k", lw=4, alpha=0.35,
           label="whole step (planner)")
    for phase, color in PHASE_COLORS.items():
        a.plot(x, [row["totals"][phase] / gib for row in rows], marker="o", color=color, lw=1, label=f"{phase} phase")
    off = sorted(r.get("projection_unfused", []), key=lambda x: -x["rho"])
    if off:
        a.plot([row["rho"] for row in off], [row["totals"]["gradient"] / gib for row in off], marker="o",
               color="tab:red", ls="--", lw=1, label="gradient phase, unfused output layer")
    a.plot(list(PAPER_QWEN3_PEAK_GB), [v * 1e9 / gib for v in PAPER_QWEN3_PEAK_GB.values()], ls="--",
           marker="D", color="tab:orange", label="paper, end to end (8 x H200, its code)")
    _memory_axis(a, x, ylabel="per-GPU memory (GiB)", title="memory (planner)")
    _stacked_bars(b, x, [(key, [row["time_s"][key] for row in rows], None) for key in rows[0]["time_s"]])
    _labels(b, ylabel="estimated seconds per step", title="time (planner)")
    fig.suptitle("Qwen3-8B -> Qwen3-4B, 8 x H100 80 GB, proposed memory settings (planner projection)", fontsize=10)
    fig.tight_layout()
    path = out / "token_budget_qwen3_8b_4b_h100.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", required=True)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    r = json.loads(Path(args.json).read_text())
    out = Path(args.out) if args.out else Path(args.json).parent
    out.mkdir(parents=True, exist_ok=True)
    for p in (plot_measured(r, out), plot_projection(r, out)):
        print(p)


if __name__ == "__main__":
    main()
