"""Convert checkpoints between Hugging Face and megatron-core (Llama-3, Qwen2/2.5, Qwen3).

  python tools/convert_checkpoint.py hf-to-megatron --hf-dir D --out O --tp 2 --pp 1 [--dtype bf16]
  python tools/convert_checkpoint.py megatron-to-hf --megatron-dir O --out D2 [--max-shard-size 5GB]

hf-to-megatron spawns TP x PP gloo ranks on CPU, or runs in place under torchrun with that world
size. megatron-to-hf loads the checkpoint (any layout) at TP=1 in one process and streams tensors
into safetensors shards. Bad input fails before anything is written; outputs appear atomically.
"""
from __future__ import annotations

import argparse
import os
import re
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def parse_size(text: str) -> int:
    """'5GB' / '500MB' / '1024' -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)?\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {text!r} (e.g. 5GB, 500MB, 1048576)")
    unit = (m.group(2) or "").upper().rstrip("B").rstrip("I")
    return int(float(m.group(1)) * {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}[unit])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    args = p.parse_args(argv)

    from megatron_tip.convert import hf_to_megatron, megatron_to_hf
    from megatron_tip.testing import RankFailure

    try:
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
