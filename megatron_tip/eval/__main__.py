"""Evaluate a HF checkpoint on a math JSONL set: mean@n and pass@k.

    python -m megatron_tip.eval --model <hf_dir> --data shared/data/math500.jsonl \\
        --samples 16 --temperature 1.0 --out results.jsonl
"""
from __future__ import annotations

import argparse
from pathlib import Path
import time

import torch

from megatron_tip.data.prompts import INSTRUCTION, resolve_format
from megatron_tip.data.jsonl import read_problems

from .runner import check_hf_dir, evaluate, make_hf_generate_fn, print_summary, write_results


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m megatron_tip.eval", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True,
                    help="HF checkpoint dir, or a megatron_tip checkpoint dir (exported to HF in a temp dir)")
    ap.add_argument("--data", required=True, help="JSONL with 'problem' and 'answer' fields")
    ap.add_argument("--samples", type=int, default=16, help="completions per problem (n of mean@n)")
    ap.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--max-new-tokens", type=int, default=8192)
    ap.add_argument("--limit", type=int, default=None, help="first N problems only")
    ap.add_argument("--batch-size", type=int, default=16, help="sequences per generate call")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="per-problem JSONL (summary goes to <stem>.summary.json)")
    ap.add_argument("--prompt-format", default="auto",
                    help="auto | chat | plain | a template with {problem} (auto: model's prompt_template.txt, "
                         "else chat template, else plain)")
    ap.add_argument("--instruction", default=INSTRUCTION)
    ap.add_argument("--enable-thinking", choices=["true", "false"], default=None,
                    help="passed to chat templates that support it (Qwen3)")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    if args.samples < 1:
        ap.error("--samples must be >= 1")
    if not 0.0 < args.top_p <= 1.0:
        ap.error("--top-p must be in (0, 1]")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    import tempfile

    export_dir = Path(tempfile.mkdtemp(prefix="megatron_tip_eval_")) / "hf"
    model_dir = check_hf_dir(args.model, export_to=export_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    dtype = "auto" if args.dtype == "auto" else getattr(torch, args.dtype)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(args.device)
    thinking = None if args.enable_thinking is None else args.enable_thinking == "true"
    fmt = resolve_format(tokenizer, fmt=args.prompt_format, model_dir=model_dir,
                         instruction=args.instruction, enable_thinking=thinking)
    problems = read_problems(args.data, limit=args.limit, what="data file")
    gen = make_hf_generate_fn(model, tokenizer, temperature=args.temperature, top_p=args.top_p,
                              max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, seed=args.seed,
                              add_special_tokens=fmt.add_special_tokens, progress=not args.no_progress)
    t0 = time.time()
    rows, summary = evaluate(problems, gen, samples=args.samples, tokenizer=tokenizer, fmt=fmt,
                             progress=not args.no_progress)
    summary.update(model=str(model_dir), data=str(args.data), temperature=args.temperature, top_p=args.top_p,
                   max_new_tokens=args.max_new_tokens, seed=args.seed, seconds=round(time.time() - t0, 1))
    if args.out:
        out, summary_path = write_results(rows, summary, args.out)
        print(f"wrote {out} and {summary_path}")
    print_summary(summary, title=f"{model_dir.name} on {args.data}")
    return summary


if __name__ == "__main__":
    main()
