"""Planner reports for the paper-pair configs: as configured, and with the changes proposed beyond the YAML.

    python tools/plan_paper_configs.py                      # print the reports
    python tools/plan_paper_configs.py --out docs/planner   # write <config>.txt (+ <config>.proposed.txt)
    python tools/plan_paper_configs.py --table              # the variants table of docs/planner.md §4

The YAMLs carry the memory settings the planner argues for (distributed optimizer, a small
scoring.stats_chunk_size). ``PROPOSED`` holds, per config, what the planner proposes beyond
memory keys (a layout change); an empty list means the YAML is the proposal.
"""
from __future__ import annotations

import argparse
import contextlib
import io
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "examples" / "configs"

PROPOSED: dict[str, list[str]] = {
    "qwen3_8b_to_4b": [],
    "qwen3_8b_to_1p7b": [],
    "qwen25_14b_to_1p5b": [],
    # As configured (TP=8 x PP=2, two nodes, megatron engine) it fits, but the megatron engine has
    # no KV cache at PP>1 (~9 h of rollout per step). TP=8 x PP=1 fits one node, and PP=1 allows the
    # vLLM engine with sleep mode as in the Qwen configs; full recomputation for headroom.
    "llama33_70b_to_llama31_8b": ["parallel.pipeline_parallel=1", "student.recompute_granularity=full",
                                  "rollout.engine=vllm", "rollout.vllm_sleep_level=1"],
}


def report(name: str, *, proposed: bool = False, extra: list[str] = (), json_out: bool = False) -> tuple[int, str]:
    """(exit code, text) of ``python -m megatron_tip.plan`` on examples/configs/<name>.yaml (+ PROPOSED)."""
    from megatron_tip.plan.__main__ import main

    argv = ["--config", f"examples/configs/{name}.yaml", *(["--json"] if json_out else []),
            *(PROPOSED.get(name, []) if proposed else []), *extra]
    buf = io.StringIO()
    with contextlib.chdir(REPO), contextlib.redirect_stdout(buf):  # the report names the config as given
        rc = main(argv)
    return rc, buf.getvalue()


# (label, overrides) rows of the variants table, per config (the proposal is added where there is one)
VARIANTS = [("**as configured**", []),
            ("without distributed optimizer, stats chunk 2048",
             ["optim.distributed_optimizer=false", "scoring.stats_chunk_size=2048", "scoring.fused_chunk_size=2048"]),
            ("unfused gradient-pass output layer", ["scoring.fused_output_layer=false"]),
            ("vLLM sleep level 0", ["rollout.vllm_sleep_level=0"]),
            ("rollout.engine=megatron", ["rollout.engine=megatron"])]


def table() -> str:
    """Markdown rows: per config and variant, GiB per phase (worst stage), peak, fit, step seconds."""
    import json

    import yaml

    gib = 2**30
    lines = ["| config | settings | layout | rollout | scoring | gradient | optimizer | peak | fit | step s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name in PROPOSED:
        engine = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text()).get("rollout", {}).get("engine")
        variants = list(VARIANTS) if engine == "vllm" else [VARIANTS[0], VARIANTS[2]]
        if PROPOSED[name]:
            variants += [("**proposed: " + ", ".join(PROPOSED[name]) + "**", PROPOSED[name]),
                         ("proposed with the megatron engine", PROPOSED[name] + ["rollout.engine=megatron"])]
        for label, extra in variants:
            rc, text = report(name, extra=extra, json_out=True)
            p = json.loads(text)
            st = p["stages"][p["worst_stage"]]
            lay = p["layout"]
            t = p["time_s"]
            scoring = t["teacher scoring"] + t["student scoring"]
            fit = "fits" + (", tight" if p["tight"] else "") if p["fits"] else "**does not fit**"
            lines.append(
                f"| {name} | {label} | {lay['tp'] * lay['pp'] * lay['dp']} GPUs, TP{lay['tp']} PP{lay['pp']} "
                f"DP{lay['dp']} | " + " | ".join(f"{st['totals'].get(k, 0) / gib:.1f}" for k in
                                                 ("rollout", "scoring", "gradient", "optimizer"))
                + f" | **{p['peak_bytes'] / gib:.1f}** ({p['peak_phase']}) | {fit} | {sum(t.values()):.0f} "
                f"({t['rollout']:.0f} / {scoring:.0f} / {t['gradient pass + optimizer']:.0f} / "
                f"{t['weight sync']:.1f}) |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="folder for <config>.txt (default: print)")
    ap.add_argument("--table", action="store_true", help="print the variants table (markdown) instead")
    args = ap.parse_args()
    if args.table:
        print(table())
        return
    for name in PROPOSED:
        for proposed in (False, True) if PROPOSED[name] else (False,):
            rc, text = report(name, proposed=proposed)
            if rc:
                raise SystemExit(f"{name}: planner exit {rc}")
            extra = PROPOSED[name] if proposed else []
            cmd = " ".join(["python -m megatron_tip.plan --config", f"examples/configs/{name}.yaml", *extra])
            text = f"$ {cmd}\n{text}"
            if args.out:
                Path(args.out).mkdir(parents=True, exist_ok=True)
                (Path(args.out) / f"{name}{'.proposed' if proposed else ''}.txt").write_text(text)
            else:
                print(text)


if __name__ == "__main__":
    main()
