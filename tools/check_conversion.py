"""Compare an HF model with its megatron conversion on the same token batch.

  python tools/check_conversion.py --hf-dir D --megatron-dir O [--tp 2] [--pp 1] [--tol 1e-4]

Runs HF in fp32 and the megatron checkpoint (loaded in fp32 at TP x PP, gloo ranks on CPU),
prints max |Δlogit| and mean KL(HF || megatron); exit code 1 when max |Δlogit| > tol.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf-dir", required=True)
    p.add_argument("--megatron-dir", required=True)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--tol", type=float, default=1e-4)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    import torch

    from megatron_tip.convert.checkpoint import read_checkpoint_info
    from megatron_tip.convert.verify import compare_logits, hf_logits, megatron_checkpoint_logits

    try:
        spec, _ = read_checkpoint_info(args.megatron_dir)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    ids = torch.randint(0, spec.vocab_size, (args.batch, args.seq),
                        generator=torch.Generator().manual_seed(args.seed))
    ref = hf_logits(args.hf_dir, ids)
    out = megatron_checkpoint_logits(args.megatron_dir, ids, tp=args.tp, pp=args.pp)
    stats = compare_logits(ref, out)
    ok = stats["max_abs_diff"] <= args.tol
    print(f"max |dlogit| = {stats['max_abs_diff']:.3e}   mean KL = {stats['mean_kl']:.3e}   "
          f"(tol {args.tol:g}, TP={args.tp} PP={args.pp}) -> {'OK' if ok else 'FAIL'}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
