"""Peak memory and time of one TIP training step vs keep ratio ρ, side by side in one run.

A config where logits dominate (large vocab, small hidden): the gradient pass applies both
output layers only at kept positions, so its memory should scale with ρ. Each ρ runs in its own
forked process on the same synthetic rollouts (rollout generation is not part of the measured
path). Memory = peak bytes of live tensors allocated inside the measured region, tracked by
megatron_tip.testing.memory.PeakMemory (a dispatch-mode tracker that works on CPU); model weights and the
optimizer's existing state are outside it. Time = best of --repeats.

    python tools/bench_step_memory.py                       # V=32768, 8 x 512 tokens
    python tools/bench_step_memory.py --vocab 151936 --seqs 8 --micro-batch 8 --seq-len 256
    python tools/bench_step_memory.py --vocab 8192 --seqs 4 --seq-len 128   # quick
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from megatron_tip.launch import run_distributed
from megatron_tip.testing.memory import PeakMemory
from megatron_tip.testing.tiny_models import make_tiny_hf_model

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = REPO / "examples" / "toy" / "models" / "tokenizer"


def _measure(rank, world, args, root, rho):
    from megatron_tip.config import load_config
    from megatron_tip.rollout.layout import pad_rollouts
    from megatron_tip.distributed import init_parallel
    from megatron_tip.rollout.base import Rollout
    from megatron_tip.build import build
    from megatron_tip.selection import select_tokens
    from megatron_tip.trainer import Trainer

    torch.set_num_threads(args.threads)
    policy = "all" if rho >= 1.0 else "topk"
    cfg = load_config(None, [
        f"student.path={root / 'student'}", f"teacher.path={root / 'teacher'}",
        f"data.prompts={REPO / 'examples/toy/data/train.jsonl'}", f"scoring.vocab_size={args.vocab}", "data.max_prompt_len=32",
        f"train.micro_batch_size={args.micro_batch}", f"selection.policy={policy}",
        f"selection.keep_ratio={rho}", "log.tensorboard=false", f"run.out_dir={root / 'run'}"])
    ctx = init_parallel(1)
    setup = build(cfg, ctx)
    trainer = Trainer(cfg, ctx, setup)
    g = torch.Generator().manual_seed(0)
    rollouts = [Rollout(prompt_index=i, prompt_ids=torch.randint(4, args.vocab, (16,), generator=g).tolist(),
                        response_ids=torch.randint(4, args.vocab, (args.seq_len - 16,), generator=g).tolist())
                for i in range(args.seqs)]
    packed = pad_rollouts(rollouts, pad_id=setup.pad_id)
    times, peaks = [], {}
    for rep in range(args.repeats + 1):  # first run warms up (allocator, optimizer state)
        t0 = time.perf_counter()
        with PeakMemory() as score_mem:
            scored = trainer.score(packed)
            st = scored.stats
            sel = select_tokens(cfg.selection, norm_entropy=st["norm_entropy"], reverse_kl=st["reverse_kl"],
                                forward_kl=st["forward_kl"], valid=packed.valid, step=rep)
        t1 = time.perf_counter()
        with PeakMemory() as loss_mem:
            trainer.gradient_pass(scored, sel.mask)
        score_peak, loss_peak = score_mem.peak, loss_mem.peak
        t2 = time.perf_counter()
        setup.optimizer.step()
        if rep:
            times.append((t1 - t0, t2 - t1))
            peaks = {"score": score_peak, "loss_path": loss_peak}
    best = min(times, key=sum)
    return {"rho": rho, "kept": float(sel.mask.sum()), "tokens": float(packed.valid.sum()),
            "score_s": best[0], "grad_s": best[1], **peaks}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--seqs", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ratios", default="1.0,0.5,0.2")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for name, layers, seed in (("teacher", 2, 1), ("student", 2, 2)):
            make_tiny_hf_model(root / name, tokenizer_dir=TOKENIZER, vocab_size=args.vocab, hidden=args.hidden,
                               layers=layers, heads=2, kv_heads=2, ffn=2 * args.hidden, seed=seed)
        rows = []
        for rho in (float(r) for r in args.ratios.split(",")):
            rows.append(run_distributed(_measure, 1, args, root, rho, timeout=1800)[0])
            print(f"  measured rho={rho}", flush=True)
    base = rows[0]
    print(f"\nV={args.vocab} hidden={args.hidden} tokens={int(base['tokens'])} "
          f"(micro-batch {args.micro_batch} x {args.seq_len}); memory = peak live tensors (PeakMemory)")
    step_peak = lambda r: max(r["loss_path"], r["score"])  # noqa: E731  (the passes run one after another)
    print(f"{'rho':>5} {'kept':>7} {'loss-path MiB':>14} {'vs rho=1':>9} {'scoring MiB':>12} "
          f"{'step peak MiB':>14} {'vs rho=1':>9} {'grad pass s':>12} {'vs rho=1':>9} {'score s':>8}")
    for r in rows:
        print(f"{r['rho']:>5.2f} {int(r['kept']):>7d} {r['loss_path'] / 2**20:>14.1f} "
              f"{r['loss_path'] / base['loss_path']:>9.2f} {r['score'] / 2**20:>12.1f} "
              f"{step_peak(r) / 2**20:>14.1f} {step_peak(r) / step_peak(base):>9.2f} "
              f"{r['grad_s']:>12.3f} {r['grad_s'] / base['grad_s']:>9.2f} {r['score_s']:>8.3f}")


if __name__ == "__main__":
    main()
