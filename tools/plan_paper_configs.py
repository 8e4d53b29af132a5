"""Planner reports for the paper-pair configs, each on its cluster, and the before/after of issue #23.

    python tools/plan_paper_configs.py                      # print the reports (with --suggest)
    python tools/plan_paper_configs.py --out docs/planner   # write <config>.txt
    python tools/plan_paper_configs.py --table              # the variants table of docs/planner.md §4
    python tools/plan_paper_configs.py --before-after       # old vs new step estimates (docs/planner.md §4)

The YAMLs carry the per-role layouts the planner's ``--suggest`` ranks fastest among those that
fit with 5% headroom (``tests/unit/test_plan_cli.py`` checks that they still are). ``CLUSTER``
holds each pair's cluster; ``PROPOSED`` what the planner proposes beyond the YAML (an empty list:
the YAML is the proposal). ``BEFORE`` is the configs' state before the per-role layouts (commit
``BEFORE_COMMIT``, copied to docs/planner/before/) with the step estimate main's planner printed for it then.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "examples" / "configs"

# Each pair's cluster: 8 x H100 80 GB, the Qwen2.5 pair on 4 GPUs as in the paper.
CLUSTER: dict[str, list[str]] = {
    "qwen3_8b_to_4b": ["--nodes", "1"],
    "qwen3_8b_to_1p7b": ["--nodes", "1"],
    "qwen25_14b_to_1p5b": ["--gpus", "4"],
    "llama33_70b_to_llama31_8b": ["--nodes", "1"],
}
PROPOSED: dict[str, list[str]] = {name: [] for name in CLUSTER}

# Before issue #23's per-role layouts: one layout for every role, vLLM always eager, and the
# planner took the megatron engine's rollout batch as max(train.micro_batch_size, 8).
BEFORE_COMMIT = "639d0b7"
BEFORE = {  # the step estimates main's planner printed at BEFORE_COMMIT (docs/planner.md §4 then)
    "qwen3_8b_to_4b": {"cluster": "8 GPUs, TP2 PP1 DP4", "step_s": 129},
    "qwen3_8b_to_1p7b": {"cluster": "8 GPUs, TP2 PP1 DP4", "step_s": 90},
    "qwen25_14b_to_1p5b": {"cluster": "8 GPUs, TP2 PP1 DP4", "step_s": 65},
    "llama33_70b_to_llama31_8b": {"cluster": "16 GPUs, TP8 PP2 DP1", "step_s": 31433},
}


def _run(argv: list[str]) -> tuple[int, str]:
    from megatron_tip.plan.__main__ import main

    buf = io.StringIO()
    with contextlib.chdir(REPO), contextlib.redirect_stdout(buf):  # the report names the config as given
        rc = main(argv)
    return rc, buf.getvalue()


def report(name: str, *, proposed: bool = False, extra: list[str] = (), json_out: bool = False,
           suggest: bool = False) -> tuple[int, str]:
    """(exit code, text) of ``python -m megatron_tip.plan`` on examples/configs/<name>.yaml, on its cluster."""
    argv = ["--config", f"examples/configs/{name}.yaml", *CLUSTER[name], *(["--json"] if json_out else []),
            *(["--suggest"] if suggest else []), *(PROPOSED.get(name, []) if proposed else []), *extra]
    return _run(argv)


def before_report(name: str, *, json_out: bool = True) -> tuple[int, str]:
    """The config as it was at BEFORE_COMMIT, planned by this planner on its cluster then."""
    # a copy kept in docs (a shallow clone, as CI may use, lacks the old commit)
    path = REPO / "docs" / "planner" / "before" / f"{name}.yaml"
    return _run(["--config", str(path), *(["--json"] if json_out else [])])


# (label, overrides) rows of the variants table, per config (the proposal is added where there is one)
VARIANTS = [("**as configured**", []),
            ("without distributed optimizer, stats chunk 2048",
             ["optim.distributed_optimizer=false", "scoring.stats_chunk_size=2048", "scoring.fused_chunk_size=2048"]),
            ("unfused gradient-pass output layer", ["scoring.fused_output_layer=false"]),
            ("vLLM eager (rollout.vllm_enforce_eager=true)", ["rollout.vllm_enforce_eager=true"]),
            ("vLLM sleep level 0", ["rollout.vllm_sleep_level=0"]),
            ("every role in the student's layout", ["teacher.parallel.tensor_parallel=0",
                                                    "teacher.parallel.pipeline_parallel=0", "rollout.tensor_parallel=0",
                                                    "teacher.offload=false"]),
            ("rollout.engine=megatron", ["rollout.engine=megatron"])]


def _row(name: str, label: str, p: dict) -> str:
    gib = 2**30
    if "stages" not in p:
        return f"| {name} | {label} | — | — | — | — | — | — | refused | — |"
    st = p["stages"][p["worst_stage"]]
    lay, roles, t = p["layout"], p["roles"], p["time_s"]
    scoring = t["teacher scoring"] + t["student scoring"] + t["teacher hidden transfer"] + \
        t["teacher offload (host -> GPU)"]
    fit = "fits" + (", tight" if p["tight"] else "") if p["fits"] else "**does not fit**"
    te, ro = roles["teacher"], roles["rollout"]
    where = (f"{lay['world']} GPUs; S TP{lay['tp']} PP{lay['pp']} DP{lay['dp']}; T TP{te['tp']} PP{te['pp']}"
             f"{' offload' if te['offload'] else ''}; R {ro['engine']}"
             + (f" {ro['engines']}xTP{ro['tp']}{'' if ro['cuda_graphs'] else ' eager'}" if ro["engine"] == "vllm" else ""))
    return (f"| {name} | {label} | {where} | " + " | ".join(f"{st['totals'].get(k, 0) / gib:.1f}" for k in
                                                          ("rollout", "scoring", "gradient", "optimizer"))
            + f" | **{p['peak_bytes'] / gib:.1f}** ({p['peak_phase']}) | {fit} | {sum(t.values()):.0f} "
            f"({t['rollout']:.0f} / {scoring:.0f} / {t['gradient pass + optimizer']:.0f} / {t['weight sync']:.1f}) |")


def table() -> str:
    """Markdown rows: per config and variant, GiB per phase (worst stage), peak, fit, step seconds."""
    lines = ["| config | settings | layout (S student, T teacher, R rollout) | rollout | scoring | gradient | "
             "optimizer | peak | fit | step s (rollout / scoring / gradient / sync) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name in CLUSTER:
        for label, extra in VARIANTS:
            rc, text = report(name, extra=extra, json_out=True)
            lines.append(_row(name, label, json.loads(text)) if rc == 0 else _row(name, label, {}))
    return "\n".join(lines)


def before_after() -> str:
    """Markdown: per config, main's estimate before #23, the old config under this planner, the new one."""
    lines = ["| config | before #23: layout | before: main's planner, s/step | before: this planner, s/step "
             "(peak GiB) | now: layout | now: s/step (peak GiB) | speed-up vs main's |",
             "|---|---|---|---|---|---|---|"]
    gib = 2**30
    for name, old in BEFORE.items():
        rc, text = before_report(name)
        b = json.loads(text)
        b_fit = "" if b["fits"] and not b["tight"] else ", tight" if b["fits"] else ", does not fit"
        rc, text = report(name, json_out=True)
        n = json.loads(text)
        r = n["roles"]
        now = (f"{n['layout']['world']} GPUs: S TP{r['student']['tp']} PP{r['student']['pp']} DP{r['student']['dp']}, "
               f"T TP{r['teacher']['tp']} PP{r['teacher']['pp']}{' offload' if r['teacher']['offload'] else ''}, "
               f"R {r['rollout']['engine']} {r['rollout']['engines']}xTP{r['rollout']['tp']}")
        new_s = sum(n["time_s"].values())
        lines.append(f"| {name} | {old['cluster']} | {old['step_s']:,} | {sum(b['time_s'].values()):,.0f} "
                     f"({b['peak_bytes'] / gib:.1f}{b_fit}) | {now} | **{new_s:,.0f}** ({n['peak_bytes'] / gib:.1f}) | "
                     f"{old['step_s'] / new_s:,.1f}x |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="folder for <config>.txt (default: print)")
    ap.add_argument("--table", action="store_true", help="print the variants table (markdown) instead")
    ap.add_argument("--before-after", action="store_true", help="print the before/after table (markdown) instead")
    args = ap.parse_args()
    if args.table or args.before_after:
        print(table() if args.table else before_after())
        return
    for name in CLUSTER:
        rc, text = report(name, suggest=True)
        if rc:
            raise SystemExit(f"{name}: planner exit {rc}")
        cmd = " ".join(["python -m megatron_tip.plan --config", f"examples/configs/{name}.yaml", *CLUSTER[name],
                        "--suggest"])
        text = f"$ {cmd}\n{text}"
        if args.out:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            (Path(args.out) / f"{name}.txt").write_text(text)
        else:
            print(text)


if __name__ == "__main__":
    main()
