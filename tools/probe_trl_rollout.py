"""What TRL's GKDTrainer rollout costs on the toy, with and without TRL's default gradient checkpointing.

TRL 1.x defaults ``gradient_checkpointing=True``; ``GKDTrainer`` then samples with
``use_cache=False`` (every decode step re-runs the whole prefix). This prints, in one process with
1 thread, for each setting: the generation config's ``use_cache``, TRL's
``generate_on_policy_outputs`` time on 16 toy prompts x 4 samples (<= 48 new tokens, T=1), and a
plain ``model.generate`` of the same batch with TRL's generation config and with a KV cache, side
by side (docs/speed.md). Needs TRL (``pip install -e .[bench]`` in a venv of its own):

    OMP_NUM_THREADS=1 python tools/probe_trl_rollout.py --repeats 3
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOY = ROOT / "examples/toy"


def _batch(tok, *, prompts: int, samples: int):
    """Left-padded [prompts * samples, width] ids and mask of the first train prompts, prompt-major."""
    import torch

    template = (TOY / "models/student/prompt_template.txt").read_text()
    lines = (TOY / "data/train.jsonl").read_text().splitlines()[:prompts]
    rows = [tok(template.format(problem=json.loads(x)["problem"]))["input_ids"] for x in lines]
    rows = [r for r in rows for _ in range(samples)]
    width = max(map(len, rows))
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r):], mask[i, width - len(r):] = torch.tensor(r), 1
    return ids, mask


def _timed(fn) -> tuple[float, object]:
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def probe(*, checkpointing: bool, repeats: int, max_new_tokens: int) -> None:
    """Print TRL's rollout time and plain generate times for one ``gradient_checkpointing`` value."""
    import torch
    import transformers
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    torch.manual_seed(0)
    student, teacher = TOY / "models/student", TOY / "models/teacher"
    tok = AutoTokenizer.from_pretrained(student)
    ids, mask = _batch(tok, prompts=16, samples=4)
    with tempfile.TemporaryDirectory() as tmp:
        args = GKDConfig(output_dir=tmp, per_device_train_batch_size=len(ids), lmbda=1.0, beta=1.0, temperature=1.0,
                         max_new_tokens=max_new_tokens, use_cpu=True, report_to="none", save_strategy="no",
                         logging_strategy="no", gradient_checkpointing=checkpointing)
        trainer = GKDTrainer(model=AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32),
                             teacher_model=AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32),
                             args=args, train_dataset=Dataset.from_dict({"messages": [[{"role": "user", "content": "x"}]]}),
                             processing_class=tok, data_collator=lambda rows: rows)
        torch.set_num_threads(1)
        config, model = trainer.generation_config, trainer.model.eval()
        config.eos_token_id = [tok.eos_token_id]
        inputs = {"prompts": ids, "prompt_attention_mask": mask}
        cached = {"max_new_tokens": max_new_tokens, "do_sample": True, "top_k": 0, "top_p": 1.0, "use_cache": True,
                  "eos_token_id": [tok.eos_token_id], "pad_token_id": tok.pad_token_id}
        print(f"TRL {trl.__version__}, transformers {transformers.__version__}, gradient_checkpointing={checkpointing}: "
              f"generate use_cache={config.use_cache}, {len(ids)} rows x {ids.shape[1]} prompt columns")
        with torch.no_grad():
            for r in range(repeats):
                t_trl, out = _timed(lambda: trainer.generate_on_policy_outputs(model, inputs, config))
                t_same, _ = _timed(lambda: model.generate(input_ids=ids, attention_mask=mask, generation_config=config))
                t_cache, _ = _timed(lambda: model.generate(input_ids=ids, attention_mask=mask, **cached))
                print(f"  repeat {r}: TRL rollout {t_trl:.3f} s ({out[0].shape[1] - ids.shape[1]} new tokens), "
                      f"plain generate same config {t_same:.3f} s, plain generate with KV cache {t_cache:.3f} s")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    for checkpointing in (True, False):
        probe(checkpointing=checkpointing, repeats=args.repeats, max_new_tokens=args.max_new_tokens)


if __name__ == "__main__":
    main()
