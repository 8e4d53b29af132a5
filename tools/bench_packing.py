"""Padding vs token-budget micro-batches on one step, side by side in one run (issue #22).

The same synthetic rollouts go through the trainer's own ``train_step`` (rollout generation
replaced by the fixed rollouts, so only the layout differs) twice per repeat: once with
``train.max_tokens_per_microbatch=0`` (every rollout padded to the step's longest sequence,
``train.micro_batch_size`` rows per micro-batch) and once with a token budget of
micro_batch_size x the longest allowed sequence (same worst-case micro-batch size). Modes
alternate within each repeat; the best repeat of each is reported.

Mixes (CPU-scaled shape of the paper's workload: prompts up to 2,048, responses up to 8,192):
  long-tailed  10% of responses at the cap, the rest log-normal around 0.3 x cap (sigma 0.6)
  uniform      responses uniform in [16, cap]
prompts uniform in [16, --prompt-cap], --rollouts-per-prompt rollouts each.

Columns: processed/real = positions the forwards compute / real (prompt + response) positions;
score s = teacher + student scoring pass; grad s = the student's forward/backward on kept
positions; step s = the whole train_step (score, select, gradient pass, optimizer step).

    python tools/bench_packing.py                        # 8 prompts x 16 rollouts, cap 1,024
    python tools/bench_packing.py --prompts 4 --response-cap 256 --repeats 1   # quick
"""
from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import torch

from megatron_tip.launch import run_distributed
from megatron_tip.testing.tiny_models import make_tiny_hf_model

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = REPO / "examples" / "toy" / "models" / "tokenizer"


def response_lengths(mix: str, n: int, *, cap: int, g: torch.Generator) -> list[int]:
    """``n`` response lengths of ``mix`` (long-tailed | uniform), each in [16, cap]."""
    if mix == "uniform":
        return torch.randint(16, cap + 1, (n,), generator=g).tolist()
    sigma = 0.6
    mu = math.log(0.3 * cap) - sigma ** 2 / 2  # mean 0.3 x cap (2,500 of 8,192 in the issue)
    x = torch.exp(mu + sigma * torch.randn(n, generator=g)).round().clamp(16, cap).long()
    at_cap = torch.rand(n, generator=g) < 0.1
    return torch.where(at_cap, torch.full_like(x, cap), x).tolist()


def _measure(rank, world, args, root):
    from megatron_tip.build import build
    from megatron_tip.config import load_config
    from megatron_tip.data.dataset import Prompt
    from megatron_tip.distributed import init_parallel
    from megatron_tip.rollout.base import Rollout
    from megatron_tip.trainer import Trainer

    torch.set_num_threads(args.threads)
    n_rollouts = args.prompts * args.rollouts_per_prompt
    cfg = load_config(None, [
        f"student.path={root / 'student'}", f"teacher.path={root / 'teacher'}",
        f"data.prompts={REPO / 'examples/toy/data/train.jsonl'}", "data.prompt_format='{problem}'",
        f"data.max_prompt_len={args.prompt_cap}",
        f"rollout.max_new_tokens={args.response_cap}", f"train.micro_batch_size={args.micro_batch}",
        f"train.prompts_per_step={args.prompts}", f"rollout.samples_per_prompt={args.rollouts_per_prompt}",
        "selection.policy=topk", "selection.keep_ratio=0.5", "optim.lr=1e-5", "log.tensorboard=false",
        f"run.out_dir={root / 'run'}", f"train.steps={10 * (args.repeats + 1)}"])
    ctx = init_parallel(1)
    trainer = Trainer(cfg, ctx, build(cfg, ctx))
    vocab = trainer.p.vocab_size
    budget = args.micro_batch * (args.prompt_cap + args.response_cap)
    timed: dict[str, float] = {}
    for name in ("score", "gradient_pass"):
        def wrap(fn, name=name):
            def call(*a, **k):
                t0 = time.perf_counter()
                out = fn(*a, **k)
                timed[name] = time.perf_counter() - t0
                return out
            return call
        setattr(trainer, name, wrap(getattr(trainer, name)))
    results = {}
    step = 0
    for mix in ("long-tailed", "uniform"):
        g = torch.Generator().manual_seed(0)
        prompts, rollouts = [], []
        for i in range(args.prompts):
            ids = torch.randint(4, vocab, (int(torch.randint(16, args.prompt_cap + 1, (1,), generator=g)),),
                                generator=g).tolist()
            prompts.append(Prompt(problem="", answer="0", ids=ids))
            for n in response_lengths(mix, args.rollouts_per_prompt, cap=args.response_cap, g=g):
                rollouts.append(Rollout(prompt_index=i, prompt_ids=ids,
                                        response_ids=torch.randint(4, vocab, (n,), generator=g).tolist()))
        trainer.rollout = lambda step, prompts=prompts, rollouts=rollouts: (prompts, rollouts)
        for rep in range(args.repeats + 1):  # the first repeat warms up (allocator, optimizer state)
            for mode, max_tokens in (("padded", 0), ("packed", budget)):
                cfg.train.max_tokens_per_microbatch = max_tokens
                t0 = time.perf_counter()
                m = trainer.train_step(step)
                row = {"step_s": time.perf_counter() - t0, "score_s": timed["score"], "grad_s": timed["gradient_pass"],
                       "factor": m["padding_factor"]}
                step += 1
                best = results.get((mix, mode))
                if rep and (best is None or row["score_s"] + row["grad_s"] < best["score_s"] + best["grad_s"]):
                    results[(mix, mode)] = row
        results[(mix, "real")] = sum(len(r.prompt_ids) + len(r.response_ids) - 1 for r in rollouts)
    return results, budget, n_rollouts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--rollouts-per-prompt", type=int, default=16)
    ap.add_argument("--prompt-cap", type=int, default=64)
    ap.add_argument("--response-cap", type=int, default=1024)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for name, hidden, seed in (("teacher", 2 * args.hidden, 1), ("student", args.hidden, 2)):
            make_tiny_hf_model(root / name, tokenizer_dir=TOKENIZER, hidden=hidden, layers=args.layers, heads=2,
                               kv_heads=2, ffn=2 * hidden, seed=seed, tie=name == "student",
                               max_positions=args.prompt_cap + args.response_cap)
        results, budget, n = run_distributed(_measure, 1, args, root, timeout=3600)[0]
    print(f"\n{n} rollouts ({args.prompts} prompts x {args.rollouts_per_prompt}), prompts <= {args.prompt_cap}, "
          f"responses <= {args.response_cap}; student hidden {args.hidden}, teacher {2 * args.hidden}, "
          f"{args.layers} layers; padded: {args.micro_batch} rows/micro-batch at the step's longest sequence; "
          f"packed: max_tokens_per_microbatch={budget}; best of {args.repeats}, {args.threads} threads")
    print(f"{'mix':<12} {'mode':<7} {'processed/real':>15} {'score s':>8} {'grad s':>8} {'score+grad':>11} "
          f"{'speed-up':>9} {'step s':>7} {'speed-up':>9}")
    for mix in ("long-tailed", "uniform"):
        pad = results[(mix, "padded")]
        for mode in ("padded", "packed"):
            r = results[(mix, mode)]
            sg = r["score_s"] + r["grad_s"]
            print(f"{mix:<12} {mode:<7} {r['factor']:>15.3f} {r['score_s']:>8.2f} {r['grad_s']:>8.2f} {sg:>11.2f} "
                  f"{(pad['score_s'] + pad['grad_s']) / sg:>8.2f}x {r['step_s']:>7.2f} "
                  f"{pad['step_s'] / r['step_s']:>8.2f}x")


if __name__ == "__main__":
    main()
