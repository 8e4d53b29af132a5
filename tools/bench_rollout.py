"""The megatron engine's rollout against another revision's, side by side in one process (issue #27).

Builds the toy trainer of ``--config`` (tiny_cpu.yaml: 16 prompts x 4 samples, 48 new tokens),
loads ``megatron_tip/rollout/megatron_engine.py`` as of git revision ``--ref`` next to the working
tree's, and runs each step's rollout with both engines over the same model, alternating which
goes first. Checks the two return the same tokens and log-probs, and prints median seconds per
rollout and the ratio ref/new (> 1: the working tree is faster).

    OMP_NUM_THREADS=1 python tools/bench_rollout.py --ref main --steps 8
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENGINE = "megatron_tip/rollout/megatron_engine.py"


def _load_ref(rev: str, tmp: str):
    src = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:{ENGINE}"], check=True,
                         capture_output=True, text=True).stdout
    path = Path(tmp) / "ref_megatron_engine.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("ref_megatron_engine", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "examples/configs/tiny_cpu.yaml"))
    ap.add_argument("--ref", default="main", help="git revision of the reference engine")
    ap.add_argument("--steps", type=int, default=8)
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    from megatron_tip.build import build
    from megatron_tip.config import load_config
    from megatron_tip.distributed import init_parallel
    from megatron_tip.trainer import Trainer

    with tempfile.TemporaryDirectory() as tmp:
        ref_mod = _load_ref(args.ref, tmp)
        cfg = load_config(args.config, [f"run.out_dir={tmp}/run", "log.tensorboard=false"])
        ctx = init_parallel(1, pp=1, seed=cfg.train.seed)
        parts = build(cfg, ctx)
        trainer = Trainer(cfg, ctx, parts)
        new = parts.engine
        ref = ref_mod.MegatronEngine(new.model, ctx=new.ctx, vocab_size=new.vocab_size, pad_id=new.pad_id,
                                     micro_batch_size=new.micro_batch_size)
        times: dict[str, list[float]] = {"ref": [], "new": []}
        engines = {"ref": ref, "new": new}
        trainer.rollout(0)  # warm-up
        for step in range(args.steps):
            order = ["ref", "new"] if step % 2 == 0 else ["new", "ref"]
            got = {}
            for name in order:
                parts.engine = engines[name]
                t0 = time.perf_counter()
                _, got[name] = trainer.rollout(step)
                times[name].append(time.perf_counter() - t0)
            a, b = ([(r.response_ids, r.logprobs) for r in got[k]] for k in ("ref", "new"))
            if a != b:
                sys.exit(f"error: step {step}: the engines' rollouts differ")
        parts.engine = new
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"rollout s (median of {args.steps}, {cfg.train.prompts_per_step} prompts x "
          f"{cfg.rollout.samples_per_prompt}, {cfg.rollout.max_new_tokens} new tokens, "
          f"{torch.get_num_threads()} thread): ref({args.ref}) {med['ref']:.3f}  new {med['new']:.3f}  "
          f"ratio ref/new {med['ref'] / med['new']:.2f}  (tokens and log-probs identical)")
    return med


if __name__ == "__main__":
    main()
