"""Planner reports for the paper-pair configs, with the memory settings proposed for each.

    python tools/plan_paper_configs.py                 # print the four reports
    python tools/plan_paper_configs.py --out docs/planner   # write <config>.txt there

``PROPOSED`` holds, per config, the overrides that are not in the YAML yet: the memory fields of
issue #13 (read by the planner before the config defines them) and settings whose YAML value the
planner argues against. Empty a row once the YAML carries its settings.
"""
from __future__ import annotations

import argparse
import contextlib
import io
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "examples" / "configs"

PROPOSED: dict[str, list[str]] = {
    # 73.5 GiB as is (6 GiB free, on an estimate not calibrated on a GPU): shard the fp32 main
    # params and Adam state over DP=4 (-16.9 GiB) and cap the ops' fp32 chunk (-2.7 GiB).
    "qwen3_8b_to_4b": ["optim.distributed_optimizer=true", "scoring.stats_chunk_size=256"],
    "qwen3_8b_to_1p7b": ["optim.distributed_optimizer=true", "scoring.stats_chunk_size=256"],
    "qwen25_14b_to_1p5b": ["optim.distributed_optimizer=true", "scoring.stats_chunk_size=256"],
    # PP=2 fits but the megatron engine has no KV cache at PP>1 (~9 h of rollout per step):
    # TP=8 x PP=1 on one node; sequence parallelism for headroom (needs Transformer Engine).
    "llama33_70b_to_llama31_8b": ["parallel.pipeline_parallel=1", "parallel.sequence_parallel=true",
                                  "scoring.stats_chunk_size=256"],
}


def report(name: str, *, extra: list[str] = (), json_out: bool = False) -> tuple[int, str]:
    """(exit code, text) of ``python -m megatron_tip.plan`` on examples/configs/<name>.yaml + PROPOSED."""
    from megatron_tip.plan.__main__ import main

    argv = ["--config", f"examples/configs/{name}.yaml", *(["--json"] if json_out else []),
            *PROPOSED.get(name, []), *extra]
    buf = io.StringIO()
    with contextlib.chdir(REPO), contextlib.redirect_stdout(buf):  # the report names the config as given
        rc = main(argv)
    return rc, buf.getvalue()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="folder for <config>.txt (default: print)")
    args = ap.parse_args()
    for name in PROPOSED:
        rc, text = report(name)
        if rc:
            raise SystemExit(f"{name}: planner exit {rc}")
        cmd = " ".join(["python -m megatron_tip.plan --config", f"examples/configs/{name}.yaml", *PROPOSED[name]])
        text = f"$ {cmd}\n{text}"
        if args.out:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            (Path(args.out) / f"{name}.txt").write_text(text)
        else:
            print(text)


if __name__ == "__main__":
    main()
