"""Whole-step peak memory and step time vs keep ratio ρ, measured side by side, plus the planner's view.

A Qwen3-shaped pair scaled to this CPU, with the full Qwen vocabulary (V=151,936), so the output
layer and the logits dominate as at real proportions they do not (see docs/planner.md). Each ρ
runs in its own forked process the trainer's real ``train_step``: rollout (megatron engine),
scoring, selection, gradient pass, optimizer step, with the trainer's defaults
(``scoring.fused_output_layer: true``, ``scoring.ops_impl: auto`` = torch.compile'd chunk kernels
at this vocabulary); the ρ values of ``--unfused-ratios`` run a second time with
``scoring.fused_output_layer=false`` for comparison. Step 0 is a warm-up (compiles the kernels,
allocates Adam state and megatron's buffers); step 1 is timed in CPU seconds of the process per
phase (1 torch thread: robust to other jobs on a shared machine; the trainer's wall clocks are
kept in the JSON too); step 2 is measured under ``PeakMemory`` (resident storages + per-phase
peaks of new ones; its dispatch hook slows ops, so it is not timed) with ``scoring.ops_impl=eager``:
torch.compile refuses the tracker, and the eager kernels' buffers are what it can see (the
compiled kernels keep no [rows, V] temporaries, so they need less; the planner gives both).
The planner then predicts the same CPU steps, and projects the curve for Qwen3-8B -> Qwen3-4B
on 8 x H100 (examples/configs/qwen3_8b_to_4b.yaml with the proposed memory settings).

    python tools/bench_token_budget.py --out docs/results/token_budget.json
    python tools/plot_token_budget.py --json docs/results/token_budget.json --out docs/results
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = REPO / "examples" / "toy" / "models" / "tokenizer"
V = 151_936
STUDENT = dict(family="qwen3", hidden=256, layers=4, heads=8, kv_heads=2, ffn=768, tie=True)  # Qwen3-4B-like: tied
TEACHER = dict(family="qwen3", hidden=320, layers=6, heads=8, kv_heads=2, ffn=960, tie=False)
PHASES = {"rollout": "rollout", "score": "scoring", "select": "selection", "gradient_pass": "gradient",
          "optimizer_step": "optimizer", "sync_weights": "sync"}


def _overrides(args, root: Path, rho: float, fused: bool = True) -> list[str]:
    policy = ["selection.policy=all"] if rho >= 1 else ["selection.policy=topk", "selection.score=soft_or",
                                                         f"selection.keep_ratio={rho}"]
    return [f"student.path={root / 'student'}", f"teacher.path={root / 'teacher'}",
            f"data.prompts={REPO / 'examples/toy/data/train.jsonl'}", "data.max_prompt_len=128",
            f"scoring.vocab_size={V}", f"train.micro_batch_size={args.micro_batch}",
            f"train.prompts_per_step={args.prompts}", f"rollout.samples_per_prompt={args.samples}",
            f"rollout.max_new_tokens={args.new_tokens}", "train.steps=100", "optim.lr=1e-5",
            "log.tensorboard=false", f"run.out_dir={root / 'run'}",
            f"scoring.fused_output_layer={str(fused).lower()}", *policy]


def _measure(rank, world, args, root: Path, rho: float, fused: bool) -> dict:
    import torch

    import megatron_tip.ops.compiled as compiled

    from megatron_tip.build import build
    from megatron_tip.config import load_config
    from megatron_tip.distributed import init_parallel
    from megatron_tip.testing.memory import PeakMemory
    from megatron_tip.trainer import Trainer

    torch.set_num_threads(args.threads)
    cfg = load_config(None, _overrides(args, root, rho, fused))
    ctx = init_parallel(1, seed=cfg.train.seed)
    trainer = Trainer(cfg, ctx, build(cfg, ctx))
    marks: dict[str, int] = {}
    shapes: dict[str, int] = {}
    cpu: dict[str, float] = {}
    mem = None

    def wrap(name):
        original = getattr(trainer, name)

        def call(*a, **k):
            c0 = time.process_time()
            out = original(*a, **k)
            cpu[PHASES[name]] = cpu.get(PHASES[name], 0.0) + time.process_time() - c0
            if name == "score":
                shapes["seq_len"] = int(out.batch.input_ids.shape[1])
                shapes["rollouts"] = int(out.batch.input_ids.shape[0])
                shapes["response_tokens"] = int(out.batch.valid.sum())
            if name == "rollout":
                shapes["max_prompt"] = max(len(r.prompt_ids) for r in out[1])
            if mem is not None:
                marks[PHASES[name]] = mem.mark()
            return out
        setattr(trainer, name, call)

    for name in PHASES:
        wrap(name)
    # Step 0 warms up (kernel compilation, Adam state, megatron's buffers); step 1 is timed;
    # step 2 is measured for memory, with everything already allocated.
    trainer.train_step(0)
    compiled_before = len(compiled.COMPILE_LOG)
    cpu.clear()
    c0 = time.process_time()
    m = trainer.train_step(1)
    cpu["step"] = time.process_time() - c0
    wall = {k: m[f"time_{k}_s"] for k in ("rollout", "score", "select", "train", "sync")}
    cpu_s = dict(cpu)
    recompiled = len(compiled.COMPILE_LOG) - compiled_before  # kernels compiled inside the timed step
    trainer.cfg.scoring.ops_impl = "eager"  # what PeakMemory can see (see the module docstring)
    with PeakMemory() as mem:  # noqa: F811 - rebinds the closure's `mem` read by wrap()
        metrics = trainer.train_step(2)
        marks["metrics"] = mem.mark()
    resident = mem.resident
    mem = None
    return {"rho": rho, "fused": fused, "n_kept": metrics["n_kept"], "resident": resident, "phase_peaks": marks,
            "compiled_kernels": len(compiled.COMPILE_LOG), "compiled_in_timed_step": recompiled,
            "step_peak": resident + max(marks.values()), "wall_s": wall, "cpu_s": cpu_s,
            "shapes": shapes, "kept_ratio": metrics.get("kept_ratio")}


def _predict_cpu(args, root: Path, rho: float, fused: bool, shapes: dict) -> dict:
    from megatron_tip.config import load_config
    from megatron_tip.plan import build_plan
    from megatron_tip.plan.inputs import CPU_RUNTIME, inputs_from_config

    cfg = load_config(None, _overrides(args, root, rho, fused))
    inp = inputs_from_config(cfg, gpu=None, world_size=1, runtime=CPU_RUNTIME)
    inp = inp.with_(seq_len=shapes["seq_len"], prompt_len=shapes["max_prompt"])
    plan = build_plan(inp.with_(ops_impl="eager"))  # as measured
    st = plan["stages"][0]
    return {"step_peak": plan["peak_bytes"], "peak_phase": plan["peak_phase"], "totals": st["totals"],
            "step_peak_compiled": build_plan(inp.with_(ops_impl="compiled"))["peak_bytes"]}


def _project_gpu(rhos: list[float], fused: bool = True) -> list[dict]:
    """The planner's curve for the paper's Qwen3-8B -> 4B config on 8 x H100, proposed settings."""
    import importlib.util

    from megatron_tip.config import load_config
    from megatron_tip.plan import build_plan
    from megatron_tip.plan.inputs import inputs_from_config, split_overrides

    spec = importlib.util.spec_from_file_location("plan_paper_configs", REPO / "tools" / "plan_paper_configs.py")
    paper = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(paper)
    out = []
    for rho in rhos:
        sel = ["selection.policy=all"] if rho >= 1 else [f"selection.keep_ratio={rho}"]
        sel.append(f"scoring.fused_output_layer={str(fused).lower()}")
        known, planner = split_overrides(paper.PROPOSED["qwen3_8b_to_4b"] + sel)
        cfg = load_config(str(paper.CONFIGS / "qwen3_8b_to_4b.yaml"), known)
        plan = build_plan(inputs_from_config(cfg, gpu="h100-80gb", planner=planner))
        st = plan["stages"][0]
        out.append({"rho": rho, "fused": fused, "step_peak": plan["peak_bytes"], "peak_phase": plan["peak_phase"],
                    "totals": st["totals"], "time_s": plan["time_s"], "gradient_phase": st["phases"]["gradient"]})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="", help="write the results as JSON here")
    ap.add_argument("--ratios", default="1,0.5,0.2,0.1")
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--unfused-ratios", default="1,0.5,0.2",
                    help="also run these with scoring.fused_output_layer=false ('' for none)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (CPU seconds are the time measure)")
    ap.add_argument("--from-json", default="", help="print an earlier run's results (projection recomputed)")
    args = ap.parse_args()
    if args.from_json:
        result = json.loads(Path(args.from_json).read_text())
        rhos = sorted({x["rho"] for x in result["measured"]}, reverse=True)
        result["projection"] = _project_gpu(rhos)
        result["projection_unfused"] = _project_gpu(rhos, fused=False)
        _print(result)
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=2))
        return
    from megatron_tip.launch import run_distributed
    from megatron_tip.testing.tiny_models import make_tiny_hf_model

    rhos = [float(r) for r in args.ratios.split(",")]
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for name, m, seed in (("teacher", TEACHER, 1), ("student", STUDENT, 2)):
            make_tiny_hf_model(root / name, tokenizer_dir=TOKENIZER, family=m["family"], hidden=m["hidden"],
                               layers=m["layers"], heads=m["heads"], kv_heads=m["kv_heads"], ffn=m["ffn"],
                               tie=m["tie"], vocab_size=V, seed=seed)
        unfused = [float(r) for r in args.unfused_ratios.split(",") if r.strip()]
        rows = []
        for fused, ratios in ((True, rhos), (False, unfused)):
            for rho in ratios:
                row = run_distributed(_measure, 1, args, root, rho, fused, timeout=7200)[0]
                row["predicted"] = _predict_cpu(args, root, rho, fused, row["shapes"])
                rows.append(row)
                print(f"  measured rho={rho:g} fused={fused} ({time.time() - t0:.0f} s)", flush=True)
    result = {"student": STUDENT, "teacher": TEACHER, "vocab": V, "args": vars(args), "measured": rows,
              "projection": _project_gpu(rhos), "projection_unfused": _project_gpu(rhos, fused=False),
              "wall_s": time.time() - t0, "load_avg": os.getloadavg()}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
    _print(result)


def _print(r: dict) -> None:
    mib, gib = 2**20, 2**30
    base = r["measured"][0]
    sh = base["shapes"]
    print(f"\nmeasured on CPU: student {r['student']}, teacher {r['teacher']}, V={r['vocab']}; "
          f"{sh['rollouts']} rollouts x {sh['seq_len']} tokens ({sh['response_tokens']} response tokens)")
    print("memory: MiB of live tensors (resident + phase peak; eager kernels, step 2); time: CPU seconds "
          "of the step's process (1 torch thread; step 1, after a warm-up step); vs 1: against rho=1, same fused")
    print(f"{'fused':>5} {'rho':>5} {'kept':>6} {'step peak MiB':>14} {'vs 1':>6} {'planner MiB':>12} {'err':>6} "
          f"{'rollout':>8} {'scoring':>8} {'gradient':>9} {'optim':>7} {'step s':>7} {'vs 1':>6} "
          f"{'rollout s':>9} {'score s':>8} {'grad s':>7} {'optim s':>8}")
    total = lambda x: x["cpu_s"]["step"]  # noqa: E731
    for x in r["measured"]:
        base = next(b for b in r["measured"] if b["fused"] == x["fused"] and b["rho"] >= 1)
        p = x["phase_peaks"]
        pred = x["predicted"]["step_peak"]
        print(f"{'on' if x['fused'] else 'off':>5} {x['rho']:>5g} {int(x['n_kept']):>6d} {x['step_peak'] / mib:>14.1f} "
              f"{x['step_peak'] / base['step_peak']:>6.2f} {pred / mib:>12.1f} {pred / x['step_peak'] - 1:>+6.1%} "
              + "".join(f"{(x['resident'] + p.get(k, 0)) / mib:>{w}.1f}" for k, w in
                        (("rollout", 9), ("scoring", 9), ("gradient", 10), ("optimizer", 8)))
              + f" {total(x):>7.1f} {total(x) / total(base):>6.2f} {x['cpu_s']['rollout']:>9.1f} "
              f"{x['cpu_s']['scoring']:>8.1f} {x['cpu_s']['gradient']:>7.1f} {x['cpu_s']['optimizer']:>8.1f}")
    print("\nplanner projection, Qwen3-8B -> Qwen3-4B, 8 x H100 (proposed settings):")
    print(f"{'fused':>5} {'rho':>5} {'step peak GiB':>14} {'vs 1':>6} {'phase':>9} {'gradient phase GiB':>19} {'step s':>7} "
          f"{'vs 1':>6} {'grad pass s':>11}")
    for x in r["projection"] + r.get("projection_unfused", []):
        pb = next(b for b in r["projection"] + r.get("projection_unfused", []) if b["fused"] == x["fused"])
        t, t0 = sum(x["time_s"].values()), sum(pb["time_s"].values())
        print(f"{'on' if x['fused'] else 'off':>5} {x['rho']:>5g} {x['step_peak'] / gib:>14.2f} {x['step_peak'] / pb['step_peak']:>6.2f} "
              f"{x['peak_phase']:>9} {x['totals']['gradient'] / gib:>19.2f} {t:>7.0f} {t / t0:>6.3f} "
              f"{x['time_s']['gradient pass + optimizer']:>11.1f}")


if __name__ == "__main__":
    main()
