"""The toy run's steps with fixed-row vs token-budget micro-batches, alternating in one trainer (issue #27).

One trainer of ``--config`` (tiny_cpu.yaml) runs ``--steps`` training steps; even steps use
``train.max_tokens_per_microbatch=0`` (``train.micro_batch_size`` rows at the step's width), odd
steps the budget ``--budget`` (length-sorted bins, each trimmed to its longest row). Both modes see
the same machine load and the same stage of training. Prints the median non-rollout time (scoring,
selection, gradient pass, optimizer), its scoring and gradient-pass parts, and the padding factor
(positions computed / real positions) per mode, and the ratio.

    OMP_NUM_THREADS=1 python tools/bench_toy_packing.py --steps 30 --budget 1280 selection.policy=all
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
    ap.add_argument("--budget", type=int, default=1280)
    ap.add_argument("overrides", nargs="*", help="config overrides, key=value")
    args = ap.parse_args(argv)
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
        modes = {"fixed rows": 0, f"budget {args.budget}": args.budget}
        rec: dict[str, list[tuple[float, ...]]] = {name: [] for name in modes}
        for step in range(args.steps):
            name = list(modes)[step % 2]
            object.__setattr__(cfg.train, "max_tokens_per_microbatch", modes[name])  # read per step
            t0 = time.perf_counter()
            m = trainer.train_step(step)
            total = time.perf_counter() - t0
            if step >= 2:  # warm-up
                rec[name].append((total - m["time_rollout_s"], m["time_score_s"], m["time_train_s"],
                                  m["padding_factor"]))
        destroy_parallel()
    out = {name: [statistics.median(r[i] for r in rows) for i in range(4)] for name, rows in rec.items()}
    for name, (rest, score, train, pad) in out.items():
        print(f"{name:>12}: non-rollout {rest:.3f} s (scoring {score:.3f}, gradient pass + optimizer {train:.3f}); "
              f"padding factor {pad:.2f}")
    a, b = out.values()
    print(f"non-rollout fixed rows / budget: {a[0] / b[0]:.2f} (> 1: the budget is faster); "
          f"{len(next(iter(rec.values())))} steps per mode, medians")
    return out


if __name__ == "__main__":
    main()
