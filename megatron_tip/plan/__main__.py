"""python -m megatron_tip.plan --config CONFIG.yaml [--gpu NAME] [--nodes N | --gpus N] [--suggest] [key=value ...]"""
from __future__ import annotations

import argparse
import json
import sys

from megatron_tip.plan.devices import DEVICES

# A layout every cluster tiles, to search from when the given one does not (--suggest).
NEUTRAL_LAYOUT = ["parallel.tensor_parallel=1", "parallel.pipeline_parallel=1", "teacher.parallel.tensor_parallel=0",
                  "teacher.parallel.pipeline_parallel=0", "rollout.tensor_parallel=0"]


def main(argv: list[str] | None = None) -> int:
    from megatron_tip.config import load_config
    from megatron_tip.plan import build_plan, default_target, format_plan, inputs_from_config
    from megatron_tip.plan.inputs import split_overrides
    from megatron_tip.plan.memory import total_params
    from megatron_tip.plan.shapes import SHAPES
    from megatron_tip.plan.tokens import format_tokens, parse_histogram, plan_tokens

    ap = argparse.ArgumentParser(prog="python -m megatron_tip.plan", description=__doc__)
    ap.add_argument("--config", help="the training YAML (the trainer's own)")
    ap.add_argument("--gpu", default="auto", choices=["auto", "cpu", *sorted(DEVICES)],
                    help="auto (default): this machine's GPU; on a machine without one, its CPU when the "
                         "config's models are here (a CPU run, as the trainer would start it), else h100-80gb; "
                         "cpu: the run on this machine's CPU, one process per TP x PP rank")
    ap.add_argument("--nodes", type=int, default=None,
                    help="nodes of 8 GPUs (default: fewest holding each role's TP x PP)")
    ap.add_argument("--gpus", type=int, default=None,
                    help="GPUs in all (a partial node, e.g. 4; default: --nodes x 8)")
    ap.add_argument("--suggest", action="store_true",
                    help="also search the per-role layouts (student TP/PP/DP, teacher TP/PP and offload, rollout "
                         "engine and TP, recomputation, vLLM sleep) on this cluster and print the fastest that fit")
    ap.add_argument("--top", type=int, default=5, help="how many --suggest layouts to print (default 5)")
    ap.add_argument("--shape", action="append", default=[], metavar="ROLE=NAME",
                    help="model shape from the table for student/teacher, e.g. --shape student=qwen3-4b "
                         "(default: config.json at the path, else the table entry the path names)")
    ap.add_argument("--student-shape", help="same as --shape student=NAME")
    ap.add_argument("--teacher-shape", help="same as --shape teacher=NAME")
    ap.add_argument("--attention", default=None, choices=["flash", "unfused"],
                    help="flash: Transformer Engine layer spec; unfused: megatron's local spec "
                         "(default: from student.transformer_impl; auto plans Transformer Engine)")
    ap.add_argument("--no-fused-adam", action="store_true", help="torch AdamW instead of TE/apex FusedAdam")
    ap.add_argument("--mean-response-len", type=float, default=None,
                    help="expected mean response length, for the tokens a step computes (default: 0.3 x cap)")
    ap.add_argument("--response-histogram", default=None, metavar="LEN:SHARE,...",
                    help="response-length histogram instead of a mean, e.g. 1024:0.6,4096:0.3,8192:0.1")
    ap.add_argument("--json", action="store_true", help="print the plan as JSON")
    ap.add_argument("--list-shapes", action="store_true")
    ap.add_argument("overrides", nargs="*", help="dotted config overrides, as for training")
    args = ap.parse_args(argv)
    if args.list_shapes:
        for s in SHAPES.values():
            print(f"{s.name:<16} {total_params(s.spec()) / 1e9:6.2f}B  {s.source}")
        return 0
    if not args.config:
        ap.error("--config is required")
    shapes = {"student": args.student_shape, "teacher": args.teacher_shape}
    for item in args.shape:
        role, _, name = item.partition("=")
        if role not in shapes or not name:
            ap.error(f"--shape {item!r}: expected student=NAME or teacher=NAME")
        shapes[role] = name
    known, planner = split_overrides(args.overrides)
    refused = ""
    try:
        cfg = load_config(args.config, known)
        gpu = args.gpu if args.gpu != "auto" else default_target(cfg, shapes)

        def plan_inputs(c):
            return inputs_from_config(c, gpu=gpu, nodes=args.nodes, student_shape=shapes["student"],
                                      teacher_shape=shapes["teacher"], planner=planner, attention=args.attention,
                                      fused_adam=not args.no_fused_adam, gpus=args.gpus)
        try:
            inp = plan_inputs(cfg)
        except ValueError as e:  # --suggest on a cluster the given layout does not tile: search from scratch
            if not (args.suggest and (args.nodes or args.gpus)):
                raise
            refused = str(e)
            inp = plan_inputs(load_config(args.config, known + NEUTRAL_LAYOUT))
        tokens = plan_tokens(cfg, dp=inp.layout.dp, mean_response=args.mean_response_len,
                             histogram=parse_histogram(args.response_histogram) if args.response_histogram else None)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    plan = build_plan(inp)
    plan["tokens"] = tokens.to_dict()
    lines = [format_plan(inp, plan, title=args.config), ""] + format_tokens(tokens)
    if refused:
        plan = {"refused": refused, "layout": plan["layout"]}
        lines = [f"TIP step plan: {args.config}", f"  the given layout does not run on this cluster: {refused}"]
    if args.suggest:
        from megatron_tip.plan.suggest import format_suggestions, override_args, suggest

        try:
            found = suggest(inp, cfg, top=args.top)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        plan["suggestions"] = [{"overrides": override_args(f["overrides"]), "step_s": f["step_s"],
                                "peak_bytes": f["peak_bytes"], "peak_phase": f["plan"]["peak_phase"],
                                "roles": f["plan"]["roles"]} for f in found]
        lines += [""] + format_suggestions(inp, None if refused else plan, found)
    print(json.dumps(plan, indent=2) if args.json else "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
