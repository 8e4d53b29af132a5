"""Plots of a token-budget sweep (tools/sweep_tip.py): PNGs next to the CSV or in --out.

- accuracy_vs_keep_ratio.png: held-out accuracy per policy vs ρ, with all-token OPD and the
  untrained student as reference lines
- memory_throughput_vs_keep_ratio.png: peak memory and train tokens/s vs ρ
- entropy_divergence_hist.png: 2-D histogram of (h, reverse KL) over one step's tokens, the
  quadrant boundaries, and which tokens a policy kept
"""
from __future__ import annotations

import argparse
import csv
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from megatron_tip.checkpoint.safe_load import load_tensors  # noqa: E402
from sweep_tip import POLICIES  # noqa: E402  (same folder: the grid's policy order)


def read_rows(path: Path) -> list[dict]:
    with path.open() as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ValueError(f"{path} has no rows")
    for r in rows:
        for k, v in r.items():
            try:
                r[k] = float(v)
            except (TypeError, ValueError):
                pass
    return rows


METRICS = ("acc_before", "acc_after", "greedy_before", "greedy_after", "mean_kept_tokens", "frac_q3",
           "kept_frac_q3", "peak_memory_gb", "train_tokens_per_s")


def mean_over_seeds(rows: list[dict]) -> list[dict]:
    """One row per (student, policy, keep ratio): metrics averaged over seeds, the seeds'
    accuracies kept in ``acc_after_seeds`` / ``greedy_after_seeds`` for the table."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["student"], r["policy"], r["keep_ratio"]), []).append(r)
    out = []
    for rs in groups.values():
        rs = sorted(rs, key=lambda r: r["seed"])
        row = {**rs[0], **{k: sum(r[k] for r in rs) / len(rs) for k in METRICS}}
        row["seeds"] = [int(r["seed"]) for r in rs]
        row["acc_after_seeds"] = [r["acc_after"] for r in rs]
        row["greedy_after_seeds"] = [r["greedy_after"] for r in rs]
        out.append(row)
    return out


def by_policy(rows: list[dict]) -> dict[str, list[dict]]:
    out = defaultdict(list)
    for r in rows:
        out[r["policy"]].append(r)
    return {k: sorted(v, key=lambda r: r["keep_ratio"]) for k, v in out.items()}


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_accuracy(rows: list[dict], out: Path) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    groups = by_policy(rows)
    for ax, (after, before, label) in zip(axes, (("acc_after", "acc_before", "sampled, T=1.0"),
                                                 ("greedy_after", "greedy_before", "greedy"))):
        for pol, rs in groups.items():
            if pol == "all":
                ax.axhline(rs[0][after], color="black", ls="--", label="all tokens (ρ=1)")
                continue
            ax.plot([r["keep_ratio"] for r in rs], [r[after] for r in rs], marker="o", label=pol)
        ax.axhline(rows[0][before], color="gray", ls=":", label="student before OPD")
        ax.set_xscale("log")
        ax.set_xlabel("keep ratio ρ (log)")
        ax.set_title(f"held-out accuracy, {label}")
    axes[0].set_ylabel("accuracy")
    axes[0].legend(fontsize=8)
    fig.suptitle("Toy OPD: accuracy vs token budget")
    return _save(fig, out / "accuracy_vs_keep_ratio.png")


def plot_cost(rows: list[dict], out: Path) -> Path:
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for pol, rs in by_policy(rows).items():
        x = [r["keep_ratio"] for r in rs]
        a.plot(x, [r["peak_memory_gb"] for r in rs], marker="o", label=pol)
        b.plot(x, [r["train_tokens_per_s"] for r in rs], marker="o", label=pol)
    a.set_xlabel("keep ratio ρ")
    a.set_ylabel("peak RSS of the run (GiB)")
    b.set_xlabel("keep ratio ρ")
    b.set_ylabel("gradient-pass tokens/s")
    a.legend(fontsize=8)
    fig.suptitle("Cost vs token budget (toy, CPU)")
    return _save(fig, out / "memory_throughput_vs_keep_ratio.png")


def plot_hist(stats_file: Path, out: Path, *, title: str) -> Path:
    d = load_tensors(stats_file)  # tensors and plain data only: dumps may come from elsewhere
    h, kl, kept = d["norm_entropy"].float(), d["reverse_kl"].float(), d["kept"].bool()
    logkl = torch.log10(kl.clamp_min(1e-8))
    fig, ax = plt.subplots(figsize=(6, 5))
    hist = ax.hist2d(h.numpy(), logkl.numpy(), bins=40, cmap="Blues", cmin=1)
    fig.colorbar(hist[3], ax=ax, label="tokens")
    ax.scatter(h[kept].numpy(), logkl[kept].numpy(), s=3, c="tab:red", alpha=0.4, label=f"kept ({int(kept.sum())})")
    if d.get("h_threshold") is not None:
        ax.axvline(d["h_threshold"], color="k", lw=1)
    if d.get("kl_threshold") is not None:
        ax.axhline(torch.log10(torch.tensor(max(d["kl_threshold"], 1e-8))).item(), color="k", lw=1)
    for txt, (x, y) in {"Q1": (0.97, 0.97), "Q2": (0.97, 0.03), "Q3": (0.03, 0.97), "Q4": (0.03, 0.03)}.items():
        ax.text(x, y, txt, transform=ax.transAxes, ha="right" if x > 0.5 else "left",
                va="top" if y > 0.5 else "bottom", fontsize=11, weight="bold")
    ax.set_xlabel("normalized student entropy h")
    ax.set_ylabel("log10 reverse KL δ")
    ax.set_title(title)
    ax.legend(loc="center right", fontsize=8)
    return _save(fig, out / "entropy_divergence_hist.png")


def grid_order(rows: list[dict]) -> list[dict]:
    """Rows in grid order (ρ descending, then policy); a parallel sweep writes them as they finish."""
    order = list(POLICIES)
    rank = lambda p: order.index(p) if p in order else len(order)  # noqa: E731
    return sorted(rows, key=lambda r: (-r["keep_ratio"], rank(r["policy"]), r["policy"]))


def by_student(rows: list[dict]) -> dict[str, list[dict]]:
    """Rows per student tag, in the order the tags first appear (the main student first)."""
    out: dict[str, list[dict]] = {}
    for r in rows:
        out.setdefault(r["student"], []).append(r)
    return {k: grid_order(v) for k, v in out.items()}


def _pct(r: dict, key: str) -> str:
    """Seed-mean accuracy in %, with each seed's value when there are several."""
    seeds = r[f"{key}_seeds"]
    each = f" ({' / '.join(f'{100 * v:.1f}' for v in seeds)})" if len(seeds) > 1 else ""
    return f"{100 * r[key]:.1f}{each}"


def markdown_table(groups: dict[str, list[dict]]) -> str:
    """The sweep as a markdown table (held-out accuracy in %, memory, throughput), per student;
    ``groups`` is :func:`by_student` of :func:`mean_over_seeds` rows."""
    head = ("| student | policy | ρ | kept/step | T=1.0 acc | greedy acc | Q3 share (all / kept) | "
            "peak RSS GiB | grad tokens/s |\n|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for student, rs in groups.items():
        seeds = ", ".join(str(x) for x in rs[0]["seeds"])
        lines.append(f"| {student} | before OPD (seeds {seeds}) | – | – | {100 * rs[0]['acc_before']:.1f} | "
                     f"{100 * rs[0]['greedy_before']:.1f} | – | – | – |")
        for r in rs:
            lines.append(f"| {student} | {r['policy']} | {r['keep_ratio']:g} | {r['mean_kept_tokens']:.0f} | "
                         f"{_pct(r, 'acc_after')} | {_pct(r, 'greedy_after')} | "
                         f"{100 * r['frac_q3']:.1f}% / {100 * r['kept_frac_q3']:.1f}% | "
                         f"{r['peak_memory_gb']:.2f} | {r['train_tokens_per_s']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--csv", required=True)
    ap.add_argument("--out", default="")
    ap.add_argument("--hist-run", default="soft_or_r0.5", help="run-name prefix whose token dump to plot")
    ap.add_argument("--student", default="", help="student tag to plot (default: the CSV's first)")
    args = ap.parse_args()
    csv_path = Path(args.csv)
    out = Path(args.out) if args.out else csv_path.parent / "plots"
    out.mkdir(parents=True, exist_ok=True)
    groups = by_student(mean_over_seeds(read_rows(csv_path)))
    student = args.student or next(iter(groups))
    if student not in groups:
        ap.error(f"--student {student!r} is not in the CSV (has: {', '.join(groups)})")
    rows = groups[student]  # the plots show one student; the table lists them all
    made = [plot_accuracy(rows, out), plot_cost(rows, out)]
    (out / "results.md").write_text(markdown_table(groups))
    made.append(out / "results.md")
    dumps = sorted((csv_path.parent / "runs").glob(f"{args.hist_run}*{student}*/token_stats_step*.pt"))
    if not dumps:
        dumps = sorted((csv_path.parent / "runs").glob("*/token_stats_step*.pt"))
    if dumps:
        made.append(plot_hist(dumps[-1], out, title=f"{dumps[-1].parent.name}: last step"))
    for p in made:
        print(p)


if __name__ == "__main__":
    main()
