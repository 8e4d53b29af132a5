"""Convert and check checkpoints between Hugging Face and megatron-core (Llama-3, Qwen2/2.5, Qwen3).

  python -m megatron_tip.convert hf-to-megatron --hf-dir D --out O --tp 2 --pp 1 [--dtype bf16]
  python -m megatron_tip.convert megatron-to-hf --megatron-dir O --out D2 [--max-shard-size 5GB]
  python -m megatron_tip.convert check --hf-dir D --megatron-dir O [--tp 2] [--pp 1] [--tol 1e-4]

hf-to-megatron spawns TP x PP gloo ranks on CPU, or runs in place under torchrun with that world
size. megatron-to-hf loads the checkpoint (any layout) at TP=1 in one process and streams tensors
into safetensors shards. Bad input fails before anything is written; outputs appear atomically.
check runs HF in fp32 and the megatron checkpoint (fp32, TP x PP gloo ranks), prints
max |dlogit| and mean KL(HF || megatron), and exits 1 when max |dlogit| > tol.
"""
from __future__ import annotations

import argparse
import re
import sys


def parse_size(text: str) -> int:
    """'5GB' / '500MB' / '1024' -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)?\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {text!r} (e.g. 5GB, 500MB, 1048576)")
    unit = (m.group(2) or "").upper().rstrip("B").rstrip("I")
    return int(float(m.group(1)) * {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}[unit])


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m megatron_tip.convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("hf-to-megatron", help="HF checkpoint dir -> megatron checkpoint dir")
    a.add_argument("--hf-dir", required=True)
    a.add_argument("--out", required=True)
    a.add_argument("--tp", type=int, default=1)
    a.add_argument("--pp", type=int, default=1)
    a.add_argument("--dtype", default="auto", help="auto (HF config dtype) | fp32 | bf16 | fp16")
    a.add_argument("--overwrite", action="store_true")
    b = sub.add_parser("megatron-to-hf", help="megatron checkpoint dir -> HF checkpoint dir")
    b.add_argument("--megatron-dir", required=True)
    b.add_argument("--out", required=True)
    b.add_argument("--max-shard-size", type=parse_size, default=parse_size("5GB"))
    b.add_argument("--dtype", default="auto", help="auto (HF config dtype) | fp32 | bf16 | fp16")
    b.add_argument("--overwrite", action="store_true")
    b.add_argument("--no-progress", action="store_true")
    c = sub.add_parser("check", help="compare an HF model with its megatron conversion by logits")
    c.add_argument("--hf-dir", required=True)
    c.add_argument("--megatron-dir", required=True)
    c.add_argument("--tp", type=int, default=1)
    c.add_argument("--pp", type=int, default=1)
    c.add_argument("--tol", type=float, default=1e-4)
    c.add_argument("--batch", type=int, default=2)
    c.add_argument("--seq", type=int, default=32)
    c.add_argument("--seed", type=int, default=0)
    return p


def _check(args: argparse.Namespace) -> int:
    import torch

    from megatron_tip.checkpoint import read_checkpoint_info
    from megatron_tip.convert.verify import compare_logits, hf_logits, megatron_checkpoint_logits

    spec, _ = read_checkpoint_info(args.megatron_dir)
    ids = torch.randint(0, spec.vocab_size, (args.batch, args.seq),
                        generator=torch.Generator().manual_seed(args.seed))
    ref = hf_logits(args.hf_dir, ids)
    out = megatron_checkpoint_logits(args.megatron_dir, ids, tp=args.tp, pp=args.pp)
    stats = compare_logits(ref, out)
    ok = stats["max_abs_diff"] <= args.tol
    print(f"max |dlogit| = {stats['max_abs_diff']:.3e}   mean KL = {stats['mean_kl']:.3e}   "
          f"(tol {args.tol:g}, TP={args.tp} PP={args.pp}) -> {'OK' if ok else 'FAIL'}", flush=True)
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from megatron_tip.convert.run import hf_to_megatron, megatron_to_hf
    from megatron_tip.launch import RankFailure

    try:
        if args.cmd == "check":
            return _check(args)
        if args.cmd == "hf-to-megatron":
            hf_to_megatron(args.hf_dir, args.out, tp=args.tp, pp=args.pp, dtype=args.dtype,
                           overwrite=args.overwrite)
        else:
            files = megatron_to_hf(args.megatron_dir, args.out, overwrite=args.overwrite,
                                   max_shard_bytes=args.max_shard_size, dtype=args.dtype,
                                   progress=not args.no_progress)
            print(f"[convert] wrote {len(files)} weight file(s)", flush=True)
    except (ValueError, KeyError, FileNotFoundError, FileExistsError, RankFailure) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"error: {msg}", file=sys.stderr)
        return 2
    print(f"[convert] done: {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
