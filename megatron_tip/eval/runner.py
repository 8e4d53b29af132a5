"""Evaluation loop with pluggable generation.

``GenerateFn(prompts, n) -> completions[len(prompts)][n]`` is the only contract between the
evaluator and a rollout engine: HF ``generate`` here; the trainer's megatron-native or vLLM
engines can be wrapped the same way.

Sampling is configured explicitly and identically to training rollouts (``rollout.base``): T,
top_p, no top-k, no penalties, stop only on the tokenizer's EOS, max_new_tokens. Nothing comes
from the checkpoint's generation_config.json (which conversion copies: Qwen2.5-Instruct's sets
repetition_penalty 1.05-1.1, top_k 20 and extra end ids).
"""
from __future__ import annotations

import copy
import inspect
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from tqdm import tqdm

from megatron_tip.checkpoint.layout import SPEC_FILE, is_hf_dir
from megatron_tip.rollout.base import SamplingParams, sampling_settings, stop_token_ids

from .grading import extract_boxed, grade
from .metrics import aggregate, problem_metrics
from megatron_tip.data.prompts import PromptFormat, build_prompt

GenerateFn = Callable[[list[str], int], list[list[str]]]


class ModelDirError(ValueError):
    """The model directory cannot be evaluated (missing, or not a checkpoint); the CLI exits 2."""


def check_hf_dir(model_dir: str | Path, *, export_to: str | Path | None = None) -> Path:
    """Validate that ``model_dir`` is a HF checkpoint. A megatron_tip checkpoint (model_spec.json)
    is exported to HF format under ``export_to`` first (the same converter as
    python -m megatron_tip.convert megatron-to-hf); without ``export_to`` it is an error.

    Raises :class:`ModelDirError` naming the directory.
    """
    d = Path(model_dir)
    if not d.is_dir():
        raise ModelDirError(f"--model {d}: no such directory")
    if (d / SPEC_FILE).is_file() and not is_hf_dir(d):
        if export_to is None:
            raise ModelDirError(f"{d} is a megatron_tip checkpoint; evaluation loads HF checkpoints: "
                                f"convert with `python -m megatron_tip.convert megatron-to-hf` first")
        from megatron_tip.convert.run import megatron_to_hf

        megatron_to_hf(d, export_to, overwrite=True)
        return Path(export_to)
    if not is_hf_dir(d):
        raise ModelDirError(f"--model {d}: no config.json, not a HF checkpoint directory")
    return d


def hf_generation_config(params: SamplingParams, *, pad_token_id: int):
    """A transformers ``GenerationConfig`` with every sampling-relevant field set from ``params``.

    Every field that matters is set, because transformers fills fields left unset from the
    model's own generation_config.json (4.50+ unless ``use_model_defaults=False``; 5.x always,
    from ``model.generation_config``): :func:`make_hf_generate_fn` guards against both.
    """
    from transformers import GenerationConfig

    if not params.stop_token_ids:
        raise ValueError("sampling needs at least one stop token id (the tokenizer has no eos_token_id)")
    sample = params.temperature > 0
    return GenerationConfig(
        do_sample=sample, temperature=params.temperature if sample else None,
        top_p=params.top_p if sample else None, top_k=0 if sample else None, min_p=None, typical_p=1.0,
        epsilon_cutoff=0.0, eta_cutoff=0.0, repetition_penalty=1.0, encoder_repetition_penalty=1.0,
        no_repeat_ngram_size=0, bad_words_ids=None, min_new_tokens=0, max_new_tokens=params.max_new_tokens,
        num_beams=1, eos_token_id=list(params.stop_token_ids), pad_token_id=pad_token_id,
        forced_bos_token_id=None, forced_eos_token_id=None, suppress_tokens=None, begin_suppress_tokens=None,
        renormalize_logits=False, stop_strings=None)


def make_hf_generate_fn(model, tokenizer, *, temperature: float = 1.0, top_p: float = 1.0,
                        max_new_tokens: int = 1024, batch_size: int = 16, seed: int = 0,
                        add_special_tokens: bool = True, progress: bool = True,
                        stop_ids: tuple[int, ...] | None = None) -> GenerateFn:
    """A :data:`GenerateFn` over HF ``model.generate`` (batched, left padding, sampling if T > 0).

    Sampling settings are the training rollouts' (:func:`hf_generation_config`); ``stop_ids``
    defaults to the tokenizer's EOS (:func:`megatron_tip.rollout.base.stop_token_ids`). The exact
    settings are in ``generate.settings``. Sequences are flattened (prompt x sample) and chunked by
    ``batch_size``; the RNG is seeded once per call, so results are reproducible for a fixed batch size.
    """
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # left padding needs a pad id; it is masked anyway
    params = SamplingParams(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, seed=seed,
                            stop_token_ids=tuple(stop_ids) if stop_ids is not None else stop_token_ids(tokenizer))
    gen_config = hf_generation_config(params, pad_token_id=tokenizer.pad_token_id)
    # transformers 4.50-4.x fills our unset fields from the checkpoint's generation config unless
    # told not to; 5.x dropped that flag and fills them from ``model.generation_config``, which is
    # therefore swapped for ours during the call (both: nothing of generation_config.json applies).
    no_model_defaults = ({"use_model_defaults": False}
                         if "use_model_defaults" in inspect.signature(model.generate).parameters else {})

    @torch.no_grad()
    def generate(prompts: list[str], n: int) -> list[list[str]]:
        torch.manual_seed(seed)
        flat = [p for p in prompts for _ in range(n)]
        out: list[str] = []
        side, tokenizer.padding_side = tokenizer.padding_side, "left"
        own, model.generation_config = model.generation_config, copy.deepcopy(gen_config)
        model.eval()
        bar = tqdm(total=len(flat), desc="generate", unit="seq", disable=not progress)
        try:
            for i in range(0, len(flat), batch_size):
                enc = tokenizer(flat[i: i + batch_size], return_tensors="pt", padding=True,
                                add_special_tokens=add_special_tokens).to(model.device)
                ids = model.generate(**enc, generation_config=gen_config, **no_model_defaults)
                out += tokenizer.batch_decode(ids[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
                bar.update(len(ids))
        finally:
            tokenizer.padding_side = side
            model.generation_config = own
            bar.close()
        return [out[j * n: (j + 1) * n] for j in range(len(prompts))]

    generate.settings = sampling_settings(params)  # type: ignore[attr-defined]
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
    lines.append(f"  mean@{n:<4} {100 * summary[f'mean@{n}']:6.2f} ± {100 * summary[f'mean@{n}_se']:.2f} "
                 f"(standard error across problems)")
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
    table.add_row(f"mean@{n} ± s.e. (across problems)",
                  f"{100 * summary[f'mean@{n}']:.2f} ± {100 * summary[f'mean@{n}_se']:.2f}")
    table.add_row(f"std across the {n} sample sets", f"{100 * summary[f'mean@{n}_std_samples']:.2f}")
    for k, v in summary["pass@k"].items():
        table.add_row(f"pass@{k}", f"{100 * v:.2f}")
    table.caption = f"{summary['num_problems']} problems x {n} samples"
    Console().print(table)
