"""Our trainer vs Hugging Face TRL's GKDTrainer on the same toy work, side by side (issue #27).

Both distil the toy teacher into the toy student (``examples/toy/models``) with the same work per
step: the same 16 prompts (the prompt order of ``--config``, tiny_cpu.yaml by default) x 4 samples,
48 new tokens at T=1.0 (top_p 1, no top-k), the exact reverse KL on the student's own samples,
AdamW at lr 1e-4 (2 warm-up steps, then constant), gradient clipping 1.0, no weight decay.
TRL: ``GKDTrainer`` with ``lmbda=1`` (fully on-policy), ``beta=1`` (reverse KL), ``temperature=1``,
a batch of the 16 prompts each repeated 4 times; one TRL step is ``trainer.training_step`` (HF
``generate`` + teacher/student forward + loss + backward) plus clipping, ``optimizer.step`` and
the LR step, i.e. HF Trainer's inner loop without its dataloader. Ours: ``Trainer.train_step``
(rollout, scoring, selection, gradient pass, optimizer, per-step metrics incl. grading the rollouts).

Each side (ours per ``--selection``, and TRL) runs in its own process with 1 thread; the parent
interleaves them step by step (rotating which one goes first), so all see the same machine load.
Same work on both sides, checked: the same prompts, fp32 models, our stop ids as TRL's EOS, and
TRL samples in eval mode (HF ``Trainer.training_step`` leaves the model in train mode; dropout
is disabled either way); the mean response length of each side is printed. Printed: median step time
and its rollout / non-rollout parts for each and the ratios TRL/ours (> 1: ours is faster), the same
for the CPU time each process used (time.process_time: 1 thread, so less sensitive to a loaded
machine than wall time), selection's share of ours, peak
RSS of each process, wall time, and the held-out accuracy after the run (first ``--eval-limit``
held-out prompts; T=1.0 mean@4 and greedy; TRL's student sampled with HF ``generate``, ours with
its rollout engine; both graded by ``megatron_tip.eval.grading``).

Needs TRL (``pip install -e .[bench]``, in a venv of its own: it must not replace the CPU torch):

    OMP_NUM_THREADS=1 python tools/bench_vs_trl.py --steps 60 --selection all soft_or
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SELECTIONS = {"all": ["selection.policy=all"], "soft_or": []}  # tiny_cpu.yaml's default: Soft-OR top 50%


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _threads() -> None:
    import torch

    torch.set_num_threads(1)


def _ours(conn, config: str, overrides: list[str], steps: int, eval_limit: int) -> None:
    _threads()
    import torch

    from megatron_tip.build import build
    from megatron_tip.config import load_config
    from megatron_tip.distributed import destroy_parallel, init_parallel
    from megatron_tip.trainer import Trainer

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(config, [f"run.out_dir={tmp}/run", "log.tensorboard=false", f"train.steps={steps}",
                                   f"eval.limit={eval_limit}", *overrides])
        ctx = init_parallel(1, pp=1, seed=cfg.train.seed)
        parts = build(cfg, ctx)
        trainer = Trainer(cfg, ctx, parts)
        heldout = parts.eval_dataset.prompts[:eval_limit]
        conn.send({"steps": [[p.ids for p in parts.dataset.batch(s, size=cfg.train.prompts_per_step)]
                             for s in range(steps)],
                   "heldout": [(p.ids, p.answer) for p in heldout], "pad_id": parts.pad_id,
                   "samples": cfg.rollout.samples_per_prompt, "max_new_tokens": cfg.rollout.max_new_tokens,
                   "lr": cfg.optim.lr, "warmup": cfg.optim.warmup_steps, "clip": cfg.optim.clip_grad,
                   "seed": cfg.train.seed, "temperature": cfg.rollout.temperature,
                   "dtypes": (cfg.student.dtype, cfg.teacher.dtype), "stop_ids": list(parts.stop_ids),
                   "threads": torch.get_num_threads()})
        rollout, cpu = trainer.rollout, {}

        def timed_rollout(step):
            c = time.process_time()
            try:
                return rollout(step)
            finally:
                cpu["rollout"] = time.process_time() - c

        trainer.rollout = timed_rollout
        while (cmd := conn.recv())[0] == "step":
            t0, c0 = time.perf_counter(), time.process_time()
            m = trainer.train_step(cmd[1])
            total = time.perf_counter() - t0
            conn.send({"total": total, "rollout": m["time_rollout_s"], "loss": m.get("loss"),
                       "cpu": time.process_time() - c0, "cpu_rollout": cpu["rollout"],
                       "response_len": m["response_len"], "select": m["time_select_s"]})
        rss_train = _peak_rss_mib()
        t1 = trainer.evaluate(parts.eval_dataset, limit=eval_limit, samples=4, temperature=1.0)
        greedy = trainer.evaluate(parts.eval_dataset, limit=eval_limit, temperature=0.0)
        conn.send({"acc_t1": t1["eval_acc_T1"], "acc_greedy": greedy["eval_acc_greedy"], "rss": _peak_rss_mib(),
                   "rss_train": rss_train})
        destroy_parallel()


def _left_pad(rows: list[list[int]], pad_id: int):
    import torch

    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    return ids, mask


def _hf_accuracy(model, tok, heldout, *, pad_id: int, max_new_tokens: int, samples: int, greedy: bool) -> float:
    import torch

    from megatron_tip.eval.grading import grade

    ids, mask = _left_pad([p for p, _ in heldout], pad_id)
    kw = {"do_sample": False} if greedy else {"do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0,
                                              "num_return_sequences": samples}
    model.eval()
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                             eos_token_id=tok.eos_token_id, pad_token_id=pad_id, **kw)
    n = 1 if greedy else samples
    correct = 0
    for k, seq in enumerate(out[:, ids.shape[1]:].tolist()):
        if tok.eos_token_id in seq:
            seq = seq[:seq.index(tok.eos_token_id) + 1]
        correct += grade(tok.decode(seq, skip_special_tokens=True), heldout[k // n][1])
    return correct / len(out)


def _trl(conn, student: str, teacher: str) -> None:
    _threads()
    import warnings

    warnings.filterwarnings("ignore")
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    job = conn.recv()
    torch.manual_seed(job["seed"])
    # Same work as ours: fp32 both models (our config's dtypes), one thread, our stop ids as EOS.
    assert job["dtypes"] == ("float32", "float32"), f"TRL side runs fp32; ours is {job['dtypes']}"
    assert job["threads"] == 1 == torch.get_num_threads()
    tok = AutoTokenizer.from_pretrained(student)
    s_model = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32)
    t_model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32)
    n_steps, samples = len(job["steps"]), job["samples"]
    with tempfile.TemporaryDirectory() as tmp:
        args = GKDConfig(output_dir=tmp, per_device_train_batch_size=len(job["steps"][0]) * samples,
                         learning_rate=job["lr"], lr_scheduler_type="constant_with_warmup",
                         warmup_steps=job["warmup"], weight_decay=0.0, max_grad_norm=job["clip"],
                         lmbda=1.0, beta=1.0, temperature=job["temperature"], max_new_tokens=job["max_new_tokens"],
                         use_cpu=True, report_to="none", seed=job["seed"], save_strategy="no",
                         logging_strategy="no", disable_dropout=True, bf16=False, fp16=False,
                         # TRL >= 1.x defaults to gradient checkpointing, and GKDTrainer then samples
                         # with use_cache=False (every decode step re-runs the whole prefix: ~8x the
                         # rollout time here). Ours keeps a KV cache and recomputes nothing.
                         gradient_checkpointing=job["trl_gradient_checkpointing"])
        dummy = Dataset.from_dict({"messages": [[{"role": "user", "content": "x"}]]})
        trainer = GKDTrainer(model=s_model, teacher_model=t_model, args=args, train_dataset=dummy,
                             processing_class=tok, data_collator=lambda rows: rows)
        torch.set_num_threads(1)
        trainer.create_optimizer_and_scheduler(num_training_steps=n_steps)
        trainer.current_gradient_accumulation_steps = 1  # what HF Trainer's loop sets before training_step
        generate = trainer.generate_on_policy_outputs
        trainer.generation_config.eos_token_id = job["stop_ids"]
        assert trainer.generation_config.use_cache is not job["trl_gradient_checkpointing"]
        if job["trl_gradient_checkpointing"]:  # what HF Trainer.train() does with TRL's default
            trainer.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=args.gradient_checkpointing_kwargs)
        timing = {}

        def timed_generate(model, inputs, generation_config):
            # HF Trainer.training_step leaves the model in train mode; sample in eval mode as our
            # engine does (dropout is off either way: disable_dropout, and the toy has none).
            model.eval()
            t, c = time.perf_counter(), time.process_time()
            try:
                out = generate(model, inputs, generation_config)
            finally:
                timing["rollout"] = time.perf_counter() - t
                timing["cpu_rollout"] = time.process_time() - c
                model.train()
            prompt_w = inputs["prompts"].shape[1]
            timing["response_len"] = float(out[1][:, prompt_w:].sum()) / out[1].shape[0]
            return out

        trainer.generate_on_policy_outputs = timed_generate
        model = trainer.model
        import transformers
        import trl

        conn.send({"trl": trl.__version__, "transformers": transformers.__version__,
                   "use_cache": trainer.generation_config.use_cache,
                   "gradient_checkpointing": model.is_gradient_checkpointing})
        while (cmd := conn.recv())[0] == "step":
            rows = [p for p in job["steps"][cmd[1]] for _ in range(samples)]  # prompt-major, as ours
            t0, c0 = time.perf_counter(), time.process_time()
            ids, mask = _left_pad(rows, job["pad_id"])
            inputs = {"prompts": ids, "prompt_attention_mask": mask, "input_ids": ids, "attention_mask": mask,
                      "labels": torch.full_like(ids, -100)}
            loss = trainer.training_step(model, inputs)
            torch.nn.utils.clip_grad_norm_(model.parameters(), job["clip"])
            trainer.optimizer.step()
            trainer.lr_scheduler.step()
            model.zero_grad(set_to_none=True)
            total = time.perf_counter() - t0
            conn.send({"total": total, "rollout": timing["rollout"], "loss": float(loss),
                       "cpu": time.process_time() - c0, "cpu_rollout": timing["cpu_rollout"],
                       "response_len": timing["response_len"]})
        heldout, rss_train = job["heldout"], _peak_rss_mib()
        kw = {"pad_id": job["pad_id"], "max_new_tokens": job["max_new_tokens"], "samples": 4}
        conn.send({"acc_t1": _hf_accuracy(model, tok, heldout, greedy=False, **kw),
                   "acc_greedy": _hf_accuracy(model, tok, heldout, greedy=True, **kw), "rss": _peak_rss_mib(),
                   "rss_train": rss_train})


def _med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "examples/configs/tiny_cpu.yaml"))
    ap.add_argument("--selection", choices=sorted(SELECTIONS), nargs="+", default=["all"],
                    help="ours: all-token loss and/or the config's Soft-OR top 50%% (one process each, "
                         "interleaved with TRL's, which always trains on all tokens)")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=2, help="first steps left out of the medians")
    ap.add_argument("--eval-limit", type=int, default=200)
    ap.add_argument("--seed", type=int, default=None, help="train.seed override (prompt order, sampling)")
    ap.add_argument("--trl-gradient-checkpointing", action="store_true",
                    help="TRL's own default (gradient checkpointing on, hence sampling without a KV cache); "
                         "off by default: ours keeps a KV cache and recomputes no activations")
    ap.add_argument("overrides", nargs="*", help="extra dotted overrides for our trainer")
    args = ap.parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = "1"
    models = ROOT / "examples/toy/models"
    extra = ([f"train.seed={args.seed}"] if args.seed is not None else []) + args.overrides
    spawn = mp.get_context("spawn")
    t_start = time.perf_counter()
    conns, procs = {}, []
    for sel in dict.fromkeys(args.selection):
        conns[f"ours:{sel}"], w = spawn.Pipe()
        procs.append(spawn.Process(target=_ours, args=(w, args.config, SELECTIONS[sel] + extra, args.steps,
                                                       args.eval_limit)))
    conns["trl"], w = spawn.Pipe()
    procs.append(spawn.Process(target=_trl, args=(w, str(models / "student"), str(models / "teacher"))))
    for p in procs:
        p.start()
    jobs = [c.recv() for n, c in conns.items() if n != "trl"]
    assert all(j["steps"] == jobs[0]["steps"] for j in jobs), "every side samples the same prompts"
    conns["trl"].send({**jobs[0], "trl_gradient_checkpointing": args.trl_gradient_checkpointing})
    trl_info = conns["trl"].recv()
    names = list(conns)
    runs: dict[str, list[dict]] = {n: [] for n in names}
    for step in range(args.steps):
        k = step % len(names)  # rotate who goes first: every side sees the same machine load
        for name in names[k:] + names[:k]:
            conns[name].send(("step", step))
            runs[name].append(conns[name].recv())
        if step % 10 == 0 or step == args.steps - 1:
            print(f"step {step}: " + ", ".join(f"{n} {runs[n][-1]['total']:.2f} s (loss {runs[n][-1]['loss']:.4f})"
                                                for n in names), flush=True)
    for conn in conns.values():
        conn.send(("eval",))
    final = {n: c.recv() for n, c in conns.items()}
    for p in procs:
        p.join()
    wall = time.perf_counter() - t_start

    rows = {}
    for name, steps in runs.items():
        kept = steps[args.warmup:]
        rows[name] = {"step_s": _med([s["total"] for s in kept]), "rollout_s": _med([s["rollout"] for s in kept]),
                      "other_s": _med([s["total"] - s["rollout"] for s in kept]),
                      "cpu_s": _med([s["cpu"] for s in kept]), "cpu_rollout_s": _med([s["cpu_rollout"] for s in kept]),
                      "cpu_other_s": _med([s["cpu"] - s["cpu_rollout"] for s in kept]),
                      "response_len": statistics.mean(s["response_len"] for s in steps), **final[name]}
        if "select" in kept[0]:
            rows[name]["select_s"] = _med([s["select"] for s in kept])
    t = rows["trl"]
    print(f"\nbench_vs_trl: {args.steps} steps, medians over steps >= {args.warmup}, 1 thread each, "
          f"interleaved; wall {wall:.0f} s for all; load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print(f"TRL {trl_info['trl']}, transformers {trl_info['transformers']}: generate use_cache="
          f"{trl_info['use_cache']}, gradient checkpointing {trl_info['gradient_checkpointing']}")
    ours = [n for n in names if n != "trl"]
    print(f"{'':24}" + "".join(f"{n:>14}" for n in names) + "".join(f"{'TRL/' + n:>18}" for n in ours))
    for key, label in (("step_s", "step time (s)"), ("rollout_s", "rollout (s)"), ("other_s", "non-rollout (s)"),
                       ("cpu_s", "step CPU time (s)"), ("cpu_rollout_s", "rollout CPU (s)"),
                       ("cpu_other_s", "non-rollout CPU (s)")):
        print(f"{label:24}" + "".join(f"{rows[n][key]:14.3f}" for n in names)
              + "".join(f"{t[key] / rows[n][key]:18.2f}" for n in ours))
    print(f"{'  of it selection (s)':24}" + "".join(f"{rows[n]['select_s']:14.3f}" for n in ours) + f"{'-':>14}")
    print(f"{'response tokens/rollout':24}" + "".join(f"{rows[n]['response_len']:14.1f}" for n in names))
    print(f"{'peak RSS training (MiB)':24}" + "".join(f"{rows[n]['rss_train']:14.0f}" for n in names))
    print(f"{'peak RSS with eval (MiB)':24}" + "".join(f"{rows[n]['rss']:14.0f}" for n in names))
    print(f"{'held-out T=1 mean@4':24}" + "".join(f"{100 * rows[n]['acc_t1']:13.1f}%" for n in names))
    print(f"{'held-out greedy':24}" + "".join(f"{100 * rows[n]['acc_greedy']:13.1f}%" for n in names))
    if len(ours) == 2:
        a, b = (rows[f"ours:{x}"]["step_s"] for x in ("soft_or", "all"))
        print(f"Soft-OR 50% / all-token step time (ours): {a / b:.3f}")
    return rows


if __name__ == "__main__":
    main()
