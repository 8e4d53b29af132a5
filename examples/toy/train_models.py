"""Train the toy teacher and student (CPU, deterministic) and write the toy data files.

    timeout 1800 python examples/toy/train_models.py            # everything, ~10 min on 2 cores

Outputs (committed): ``models/{teacher,student}`` (safetensors + tokenizer), ``data/*.jsonl``.
The teacher is SFT-trained until it solves >=90% of held-out problems; the student is smaller and
trained only until its sampled (T=1.0) accuracy enters a target band well below the teacher's, so
on-policy distillation has room to improve it.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import sentencepiece as spm
import torch
from tqdm import tqdm
from transformers import LlamaTokenizerFast, PreTrainedTokenizerBase, Qwen3Config, Qwen3ForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
from task import EXCLUDE_N, SFT_SEEDS, format_prompt, generate_problems, split_problems, write_jsonl  # noqa: E402

HERE = Path(__file__).resolve().parent
SPECIALS = {"pad": (0, "<pad>"), "unk": (1, "<unk>"), "bos": (2, "<s>"), "eos": (3, "</s>")}


def build_tokenizer(out_dir: str | Path, *, vocab_size: int = 300, seed: int = 0) -> LlamaTokenizerFast:
    """Train a character-level sentencepiece BPE model on toy text and save it as a HF tokenizer.

    Digits are split (one token each), ``\\boxed{`` and newline are single user-defined pieces, and
    byte fallback keeps any other text encodable. ``hard_vocab_limit=False`` lets the trainer stop
    below ``vocab_size`` (the toy alphabet is tiny), so the real size is ``len(tokenizer)``.
    """
    import transformers

    if int(transformers.__version__.split(".")[0]) >= 5:  # its LlamaTokenizer ignores vocab_file (4 tokens)
        raise RuntimeError("rebuilding the toy tokenizer needs transformers<5 (pip install 'transformers<5'); "
                           "the shipped one in examples/toy/models/tokenizer loads under both")
    text = [format_prompt(p.problem) + p.solution for p in generate_problems(3000, seed=seed, min_digits=1)]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text), model_writer=buf, vocab_size=vocab_size, model_type="bpe",
        split_digits=True, byte_fallback=True, normalization_rule_name="identity",
        add_dummy_prefix=False, remove_extra_whitespaces=False, character_coverage=1.0,
        user_defined_symbols=["\\boxed{", "\n"], hard_vocab_limit=False, minloglevel=2,
        **{f"{k}_id": i for k, (i, _) in SPECIALS.items()}, **{f"{k}_piece": s for k, (_, s) in SPECIALS.items()},
    )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "tokenizer.model").write_bytes(buf.getvalue())
    tok = LlamaTokenizerFast(vocab_file=str(out_dir / "tokenizer.model"), from_slow=True, legacy=False,
                             add_prefix_space=False, pad_token="<pad>", add_bos_token=True, add_eos_token=False)
    tok.save_pretrained(out_dir)
    return tok


SIZES = {"teacher": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2),
         # 3 layers and 2 KV heads: the 2-layer, 1-KV-head student (0.43M) plateaued under OPD
         # (closed 29% of the T=1.0 gap) and could not be split for TP=2.
         "student": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=3,
                         num_attention_heads=2, num_key_value_heads=2)}


def model_config(kind: str, *, vocab_size: int, tok: PreTrainedTokenizerBase,
                 overrides: dict[str, int] | None = None) -> Qwen3Config:
    """Qwen3 configs with head_dim 64 (vLLM rejects tiny head dims); both share the vocab."""
    size = {**SIZES[kind], **(overrides or {})}
    return Qwen3Config(vocab_size=vocab_size, head_dim=64, max_position_embeddings=256,
                       tie_word_embeddings=True, rope_theta=10000.0, torch_dtype="float32",
                       pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                       eos_token_id=tok.eos_token_id, **size)


def encode_batch(tok: PreTrainedTokenizerBase, problems: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded (input_ids, attention_mask, labels); loss only on solution + EOS tokens."""
    rows, labels = [], []
    for p in problems:
        prompt = tok(format_prompt(p.problem)).input_ids
        full = tok(format_prompt(p.problem) + p.solution).input_ids + [tok.eos_token_id]
        # Rollouts tokenize the prompt alone and append sampled ids: training must match that split.
        assert full[: len(prompt)] == prompt, "prompt tokenization is not a prefix of prompt+solution"
        rows.append(full)
        labels.append([-100] * len(prompt) + full[len(prompt):])
    n = max(map(len, rows))
    ids = torch.full((len(rows), n), tok.pad_token_id)
    lab = torch.full((len(rows), n), -100)
    mask = torch.zeros((len(rows), n), dtype=torch.long)
    for i, (r, l) in enumerate(zip(rows, labels)):
        ids[i, : len(r)], lab[i, : len(l)], mask[i, : len(r)] = torch.tensor(r), torch.tensor(l), 1
    return ids, mask, lab


@torch.no_grad()
def accuracy(model, tok: PreTrainedTokenizerBase, problems: list, *, temperature: float = 0.0,
             seed: int = 0, max_new_tokens: int = 64, batch_size: int = 256) -> float:
    """Fraction of problems whose last ``\\boxed{}`` in the completion equals the true answer."""
    from megatron_tip.eval.grading import extract_boxed

    model.eval()
    torch.manual_seed(seed)
    side, tok.padding_side = tok.padding_side, "left"  # restored below: the saved tokenizer pads right
    correct = 0
    for i in range(0, len(problems), batch_size):
        chunk = problems[i: i + batch_size]
        enc = tok([format_prompt(p.problem) for p in chunk], return_tensors="pt", padding=True)
        kw = dict(do_sample=True, temperature=temperature, top_p=1.0, top_k=0) if temperature > 0 else dict(do_sample=False)
        out = model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id, **kw)
        texts = tok.batch_decode(out[:, enc.input_ids.shape[1]:], skip_special_tokens=True)
        correct += sum(extract_boxed(t) == p.answer for t, p in zip(texts, chunk))
    model.train()
    tok.padding_side = side
    return correct / len(problems)


@dataclass
class TrainResult:
    steps: int
    seconds: float
    greedy: float
    sampled: float


def train(model, tok, *, name: str, max_steps: int, lr: float, batch_size: int, seed: int,
          eval_problems: list, eval_every: int, stop_when) -> TrainResult:
    """AdamW + warmup/cosine SFT; every ``eval_every`` steps evaluate and stop if ``stop_when(greedy, sampled)``."""
    torch.manual_seed(seed)
    data = generate_problems(max_steps * batch_size, seed=seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    warm = max(1, max_steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * (0.1 + 0.45 * (1 + math.cos(math.pi * min(s, max_steps) / max_steps))))
    t0, greedy, sampled = time.time(), 0.0, 0.0
    bar = tqdm(range(max_steps), desc=name)
    for step in bar:
        ids, mask, lab = encode_batch(tok, data[step * batch_size: (step + 1) * batch_size])
        loss = model(input_ids=ids, attention_mask=mask, labels=lab).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if (step + 1) % eval_every == 0 or step + 1 == max_steps:
            greedy = accuracy(model, tok, eval_problems)
            sampled = accuracy(model, tok, eval_problems, temperature=1.0, seed=seed)
            tqdm.write(f"[{name}] step {step + 1}: loss {loss.item():.4f} greedy {greedy:.3f} T=1.0 {sampled:.3f}")
            if stop_when(greedy, sampled):
                return TrainResult(step + 1, time.time() - t0, greedy, sampled)
    return TrainResult(max_steps, time.time() - t0, greedy, sampled)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=HERE)
    # One thread: on a shared 2-core box, 2 threads were 3x slower per step than 1.
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--only", choices=["teacher", "student"], help="train one model (tokenizer/data still rebuilt)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--teacher-steps", type=int, default=800)
    ap.add_argument("--student-steps", type=int, default=800)
    ap.add_argument("--student-band", type=float, nargs=2, default=(0.25, 0.50),
                    help="stop the student once its T=1.0 accuracy lands in [lo, hi]")
    ap.add_argument("--eval-n", type=int, default=100, help="held-out problems for the stop checks")
    ap.add_argument("--eval-every", type=int, nargs=2, default=(100, 25), help="teacher, student")
    ap.add_argument("--final-eval-n", type=int, default=500)
    ap.add_argument("--student-size", nargs="*", default=[], metavar="KEY=INT",
                    help=f"override the student's shape, e.g. num_hidden_layers=3 (defaults: {SIZES['student']})")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    random.seed(0)

    tok = build_tokenizer(args.out / "models" / "tokenizer")
    vocab = len(tok)
    heldout = split_problems("heldout", args.final_eval_n)
    write_jsonl(split_problems("train", 2000), args.out / "data" / "train.jsonl", with_solution=True)
    write_jsonl(heldout, args.out / "data" / "heldout.jsonl", with_solution=True)
    stop_eval = heldout[: args.eval_n]
    report = {"tokenizer": {"vocab_size": vocab, "pad": tok.pad_token_id, "bos": tok.bos_token_id,
                            "eos": tok.eos_token_id, "unk": tok.unk_token_id}}

    lo, hi = args.student_band
    overrides = {"teacher": {}, "student": {}}
    for kv in args.student_size:
        key, _, val = kv.partition("=")
        if key not in SIZES["student"] or not val.isdigit():
            ap.error(f"--student-size expects KEY=INT with KEY in {sorted(SIZES['student'])}, got {kv!r}")
        overrides["student"][key] = int(val)
    for kind, steps, lr, seed, stop in [
        ("teacher", args.teacher_steps, 3e-3, SFT_SEEDS[0], lambda g, s: g >= 0.96 and s >= 0.93),
        ("student", args.student_steps, 2e-3, SFT_SEEDS[1], lambda g, s: lo <= s <= hi),
    ]:
        if args.only and kind != args.only:
            continue
        # Held-out problems exclude only the first EXCLUDE_N problems of each SFT stream.
        assert steps * args.batch_size <= EXCLUDE_N, "more SFT problems than the held-out exclusion covers"
        torch.manual_seed(seed)
        model = Qwen3ForCausalLM(model_config(kind, vocab_size=vocab, tok=tok, overrides=overrides[kind]))
        n_params = sum(p.numel() for p in model.parameters())
        print(f"{kind}: {n_params / 1e6:.2f}M params")
        res = train(model, tok, name=kind, max_steps=steps, lr=lr, batch_size=args.batch_size, seed=seed,
                    eval_problems=stop_eval, eval_every=args.eval_every[kind == "student"], stop_when=stop)
        final = {"greedy": accuracy(model, tok, heldout),
                 "sampled_T1": accuracy(model, tok, heldout, temperature=1.0, seed=0)}
        out = args.out / "models" / kind
        model.save_pretrained(out, safe_serialization=True)
        # The clean tokenizer files: batched evaluation leaves left-padding in the live tokenizer.
        shutil.copytree(args.out / "models" / "tokenizer", out, dirs_exist_ok=True)
        # Lets `python -m megatron_tip.eval --model <dir>` rebuild the trained prompt format.
        (out / "prompt_template.txt").write_text(format_prompt("{problem}"))
        report[kind] = {"params": n_params, "steps": res.steps, "train_seconds": round(res.seconds, 1),
                        "seed": seed, "lr": lr, "batch_size": args.batch_size, f"heldout_{len(heldout)}": final,
                        "config": {k: getattr(model.config, k) for k in (
                            "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                            "num_key_value_heads", "head_dim", "vocab_size", "tie_word_embeddings")}}
        print(json.dumps(report[kind], indent=1))
    path = args.out / "models" / "train_report.json"
    if args.only and path.exists():  # keep the other model's entry
        report = {**json.loads(path.read_text()), **report}
    path.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
