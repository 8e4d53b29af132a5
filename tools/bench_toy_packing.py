"""The toy run's steps with fixed-row vs token-budget micro-batches, in turn in one trainer (issue #27).

One trainer of ``--config`` (tiny_cpu.yaml) runs ``--steps`` training steps; step i uses the
``i % len(budgets)``-th of ``--budgets``: 0 is ``train.max_tokens_per_microbatch=0``
(``train.micro_batch_size`` rows at the step's width), N > 0 a token budget (length-sorted bins,
each trimmed to its longest row). All modes see the same machine load and the same stage of
training. Prints the median non-rollout time (scoring, selection, gradient pass, optimizer), its
scoring and gradient-pass parts, the micro-batches per step and the padding factor (positions
computed / real positions) per mode, and each mode's ratio to the first, of the time and of the
time per response token (the modes run different steps, whose rollouts differ in length: with
identical modes, ``--budgets 1280,2048,4096`` (the same bins: the pad tolerance binds first), the
time ratios spread 0.89-1.00 over 8 steps per mode, so read differences below ~10% as noise).

    OMP_NUM_THREADS=1 python tools/bench_toy_packing.py --steps 30 --budgets 0,1280 selection.policy=all
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "examples/configs/tiny_cpu.yaml"))
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--budgets", type=lambda v: [int(b) for b in v.split(",")], default=[0, 1280],
                    help="comma-separated token budgets, 0 = fixed rows (default 0,1280)")
    ap.add_argument("overrides", nargs="*", help="config overrides, key=value")
    args = ap.parse_args(argv)
    if len(set(args.budgets)) < len(args.budgets) or min(args.budgets) < 0:
        ap.error(f"--budgets needs distinct values >= 0, got {args.budgets}")
    if args.steps < 2 + len(args.budgets):  # 2 warm-up steps, then one step per mode at least
        ap.error(f"--steps {args.steps} is too few for {len(args.budgets)} modes: use >= {2 + len(args.budgets)}")
    import torch

    torch.set_num_threads(1)
    from megatron_tip.build import build
    from megatron_tip.config import load_config
    from megatron_tip.distributed import destroy_parallel, init_parallel
    from megatron_tip.trainer import Trainer

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(args.config, [f"run.out_dir={tmp}/run", "log.tensorboard=false",
                                        f"train.steps={args.steps}", *args.overrides])
        ctx = init_parallel(1, pp=1, seed=cfg.train.seed)
        trainer = Trainer(cfg, ctx, build(cfg, ctx))
        modes = {(f"budget {b}" if b else "fixed rows"): b for b in args.budgets}
        rec: dict[str, list[dict[str, float]]] = {name: [] for name in modes}
        rows = cfg.train.prompts_per_step * cfg.rollout.samples_per_prompt
        for step in range(args.steps):
            name = list(modes)[step % len(modes)]
            object.__setattr__(cfg.train, "max_tokens_per_microbatch", modes[name])  # read per step
            t0 = time.perf_counter()
            m = trainer.train_step(step)
            rest = time.perf_counter() - t0 - m["time_rollout_s"]
            if m.get("skipped"):  # no timings: the step did no update
                print(f"step {step} ({name}) skipped: left out of the medians")
            elif step >= 2:  # warm-up
                rec[name].append({"rest": rest, "score": m["time_score_s"], "train": m["time_train_s"],
                                  "pad": m["padding_factor"], "mbs": m["microbatches"],
                                  # non-rollout ms per response token of its own step
                                  "per_tok": 1e3 * rest / (m["response_len"] * rows)})
        destroy_parallel()
    if not all(rec.values()):
        raise SystemExit(f"no timed step left for {[n for n, r in rec.items() if not r]}: use more --steps")
    out = {name: {k: statistics.median(r[k] for r in recs) for k in recs[0]} for name, recs in rec.items()}
    first_name, first = next(iter(out.items()))
    for name, o in out.items():
        print(f"{name:>12}: non-rollout {o['rest']:.3f} s (scoring {o['score']:.3f}, gradient pass + optimizer "
              f"{o['train']:.3f}), {o['per_tok']:.3f} ms per response token; {o['mbs']:.0f} micro-batches, "
              f"padding factor {o['pad']:.2f}; {first_name} / this: time {first['rest'] / o['rest']:.2f}, "
              f"per token {first['per_tok'] / o['per_tok']:.2f}")
    print(f"({len(rec[first_name])} steps per mode, medians; a ratio > 1: this mode is faster)")
    return out


if __name__ == "__main__":
    main()
