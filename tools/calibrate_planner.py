"""Calibration table: the planner's memory model vs the measured memory of real training steps (CPU).

Each configuration runs the trainer's scoring pass + selection, gradient pass and optimizer step
(megatron_tip.testing.step_memory) on scaled-down models with the full Qwen vocabulary
(V=151,936), one forked process per rank, and prints per rank and phase the measured bytes
(resident storages + peak of new storages) next to the planner's prediction. Cases run the
trainer's default gradient pass (``scoring.fused_output_layer: true``) unless named ``-unfused``,
and the eager chunk kernels unless named ``-auto`` (``ops_impl=auto`` compiles them at this
vocabulary; under the memory tracker compiled kernels run as their plain-torch bodies, whose
temporaries the planner's traced CPU runtime models).

    python tools/calibrate_planner.py                  # all configurations (~15 min on 2 cores)
    python tools/calibrate_planner.py --only tp1-rho1 tp2-rho0.5
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from megatron_tip.launch import run_distributed
from megatron_tip.testing.step_memory import Case, compare, make_models, measure_rank

DEEP = dict(family="qwen3", hidden=256, layers=4, heads=8, kv_heads=2, ffn=704)
DEEP_SHAPES = dict(student={**DEEP, "tie": True}, teacher={**DEEP, "tie": False}, rollouts=4, prompt_len=32,
                   response_len=480, micro_batch=2, score_chunk_tokens=256)
CASES = [
    Case("tp1-rho1", keep_ratio=1.0),
    Case("tp1-rho0.5", keep_ratio=0.5),
    Case("tp1-rho0.2", keep_ratio=0.2),
    Case("tp1-rho0.5-unfused", keep_ratio=0.5, fused_output_layer=False),
    Case("tp1-rho0.5-auto", keep_ratio=0.5, ops_impl="auto"),
    Case("tp2-rho0.5", tp=2, keep_ratio=0.5),
    Case("pp2-rho0.5", pp=2, keep_ratio=0.5),
    Case("tp2pp2-rho0.2", tp=2, pp=2, keep_ratio=0.2),
    Case("tp2pp2-rho0.2-unfused", tp=2, pp=2, keep_ratio=0.2, fused_output_layer=False),
    Case("llama-qwen2-tp2-rho0.2", tp=2, keep_ratio=0.2, stats_chunk_size=64, fused_chunk_size=64,
         student=dict(family="llama", hidden=64, layers=2, heads=4, kv_heads=2, ffn=128, tie=True),
         teacher=dict(family="qwen2", hidden=128, layers=2, heads=8, kv_heads=2, ffn=256, tie=False)),
    Case("deep-tied-rho1", keep_ratio=1.0, **DEEP_SHAPES),
    Case("deep-tied-rho0.1", keep_ratio=0.1, **DEEP_SHAPES),
    Case("deep-tied-rho1-unfused", keep_ratio=1.0, fused_output_layer=False, **DEEP_SHAPES),
]


def _shape(c: Case) -> str:
    s, t = c.student, c.teacher
    return (f"S {s['family']} h{s['hidden']} L{s['layers']}{' tied' if s['tie'] else ''} / "
            f"T {t['family']} h{t['hidden']} L{t['layers']}; {c.rollouts}x{c.seq_len} tok, mb {c.micro_batch}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", help="case names")
    args = ap.parse_args()
    cases = [c for c in CASES if not args.only or c.name in args.only]
    print("| case | TP | PP | rho | fused | ops | shapes | rank (stage) | phase | measured MiB | predicted MiB | error | "
          "measured transient MiB | predicted transient MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    worst = 0.0
    for case in cases:
        t0 = time.time()
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            make_models(case, root)
            rows = compare(case, root, run_distributed(measure_rank, case.world, case, root, timeout=1800))
        for r in rows:
            worst = max(worst, abs(r["error"]))
            print(f"| {case.name} | {case.tp} | {case.pp} | {case.keep_ratio:g} | "
                  f"{'on' if case.fused_output_layer else 'off'} | {case.ops_impl} | {_shape(case)} | {r['rank']} "
                  f"({r['pp_rank']}) | {r['phase']} | {r['measured'] / 2**20:.1f} | {r['predicted'] / 2**20:.1f} | "
                  f"{r['error'] * 100:+.2f}% | {r['measured_transient'] / 2**20:.1f} | "
                  f"{r['predicted_transient'] / 2**20:.1f} |", flush=True)
        print(f"<!-- {case.name}: {time.time() - t0:.0f} s -->", flush=True)
    print(f"\nlargest |error| over {len(cases)} configurations: {worst * 100:.2f}%")


if __name__ == "__main__":
    main()
