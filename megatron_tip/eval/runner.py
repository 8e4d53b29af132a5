"""Evaluation loop with pluggable generation.

``GenerateFn(prompts, n) -> completions[len(prompts)][n]`` is the only contract between the
evaluator and a rollout engine: HF ``generate`` here; the trainer's megatron-native or vLLM
engines can be wrapped the same way.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from tqdm import tqdm

from megatron_tip.checkpoint.layout import SPEC_FILE, is_hf_dir

from .grading import extract_boxed, grade
from .metrics import aggregate, problem_metrics
from megatron_tip.data.prompts import PromptFormat, build_prompt

GenerateFn = Callable[[list[str], int], list[list[str]]]


def check_hf_dir(model_dir: str | Path, *, export_to: str | Path | None = None) -> Path:
    """Validate that ``model_dir`` is a HF checkpoint. A megatron_tip checkpoint (model_spec.json)
    is exported to HF format under ``export_to`` first (the same converter as
    python -m megatron_tip.convert megatron-to-hf); without ``export_to`` it is an error."""
    d = Path(model_dir)
    if (d / SPEC_FILE).is_file() and not is_hf_dir(d):
        if export_to is None:
            raise SystemExit(f"{d} is a megatron_tip checkpoint; evaluation loads HF checkpoints: "
                             f"convert with `python -m megatron_tip.convert megatron-to-hf` first")
        from megatron_tip.convert.run import megatron_to_hf

        megatron_to_hf(d, export_to, overwrite=True)
        return Path(export_to)
    if not is_hf_dir(d):
        raise SystemExit(f"{d}: no config.json, not a HF checkpoint directory")
    return d


def make_hf_generate_fn(model, tokenizer, *, temperature: float = 1.0, top_p: float = 1.0,
                        max_new_tokens: int = 1024, batch_size: int = 16, seed: int = 0,
                        add_special_tokens: bool = True, progress: bool = True) -> GenerateFn:
    """A :data:`GenerateFn` over HF ``model.generate`` (batched, left padding, sampling if T > 0).

    Sequences are flattened (prompt x sample) and chunked by ``batch_size``; the RNG is seeded once
    per call, so results are reproducible for a fixed batch size.
    """
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # left padding needs a pad id; it is masked anyway
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0) if temperature > 0 \
        else dict(do_sample=False, temperature=None, top_p=None, top_k=None)

    @torch.no_grad()
    def generate(prompts: list[str], n: int) -> list[list[str]]:
        torch.manual_seed(seed)
        flat = [p for p in prompts for _ in range(n)]
        out: list[str] = []
        side, tokenizer.padding_side = tokenizer.padding_side, "left"
        model.eval()
        bar = tqdm(total=len(flat), desc="generate", unit="seq", disable=not progress)
        try:
            for i in range(0, len(flat), batch_size):
                enc = tokenizer(flat[i: i + batch_size], return_tensors="pt", padding=True,
                                add_special_tokens=add_special_tokens).to(model.device)
                ids = model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                     **sampling)
                out += tokenizer.batch_decode(ids[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
                bar.update(len(ids))
        finally:
            tokenizer.padding_side = side
            bar.close()
        return [out[j * n: (j + 1) * n] for j in range(len(prompts))]

    return generate


def evaluate(problems: Sequence[dict], generate_fn: GenerateFn, *, samples: int, tokenizer=None,
             fmt: PromptFormat | None = None, prompt_fn: Callable[[str], str] | None = None,
             ks: Sequence[int] | None = None, progress: bool = True) -> tuple[list[dict], dict]:
    """Generate ``samples`` completions per problem, grade them, return (per-problem rows, summary).

    ``prompt_fn`` overrides prompt building (e.g. the toy task's ``format_prompt``).
    """
    build = prompt_fn or (lambda p: build_prompt(p, tokenizer=tokenizer, fmt=fmt))
    prompts = [build(row["problem"]) for row in problems]
    completions = generate_fn(prompts, samples)
    rows = []
    for row, prompt, comps in tqdm(list(zip(problems, prompts, completions)), desc="grade", disable=not progress):
        gold = str(row["answer"])
        correct = [grade(c, gold) for c in comps]
        m = problem_metrics(correct, ks=ks)
        rows.append({"problem": row["problem"], "answer": gold, "prompt": prompt, "completions": comps,
                     "extracted": [extract_boxed(c) for c in comps], "correct": correct,
                     "mean": m["mean"], "pass@k": m["pass@k"]})
    return rows, aggregate([r["correct"] for r in rows], ks=ks)


def write_results(rows: Sequence[dict], summary: dict, path: str | Path) -> tuple[Path, Path]:
    """Per-problem JSONL at ``path`` and the summary JSON beside it (``<stem>.summary.json``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    summary_path = path.with_name(path.stem + ".summary.json")
    summary_path.write_text(json.dumps(summary, indent=1) + "\n")
    return path, summary_path


def format_summary(summary: dict, *, title: str = "") -> str:
    """Plain-text summary table (mean@n, pass@k)."""
    n = summary["samples"]
    lines = [title] if title else []
    lines.append(f"problems {summary['num_problems']}  samples {n}")
    lines.append(f"  mean@{n:<4} {100 * summary[f'mean@{n}']:6.2f}")
    lines += [f"  pass@{k:<4} {100 * v:6.2f}" for k, v in summary["pass@k"].items()]
    return "\n".join(lines)


def print_summary(summary: dict, *, title: str = "") -> None:
    """Print the summary as a rich table (plain text if rich is unavailable)."""
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(format_summary(summary, title=title))
        return
    n = summary["samples"]
    table = Table(title=title or None)
    table.add_column("metric")
    table.add_column("value (%)", justify="right")
    table.add_row(f"mean@{n}", f"{100 * summary[f'mean@{n}']:.2f}")
    for k, v in summary["pass@k"].items():
        table.add_row(f"pass@{k}", f"{100 * v:.2f}")
    table.caption = f"{summary['num_problems']} problems x {n} samples"
    Console().print(table)
