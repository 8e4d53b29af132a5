"""python -m megatron_tip.plan --config CONFIG.yaml [--gpu NAME] [--nodes N] [key=value ...]"""
from __future__ import annotations

import argparse
import json
import sys

from megatron_tip.plan.devices import DEVICES


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
    ap.add_argument("--nodes", type=int, default=None, help="nodes of 8 GPUs (default: fewest holding TP x PP)")
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
    try:
        cfg = load_config(args.config, known)
        gpu = args.gpu if args.gpu != "auto" else default_target(cfg, shapes)
        inp = inputs_from_config(cfg, gpu=gpu, nodes=args.nodes, student_shape=shapes["student"],
                                 teacher_shape=shapes["teacher"], planner=planner,
                                 attention=args.attention, fused_adam=not args.no_fused_adam)
        tokens = plan_tokens(cfg, dp=inp.layout.dp, mean_response=args.mean_response_len,
                             histogram=parse_histogram(args.response_histogram) if args.response_histogram else None)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    plan = build_plan(inp)
    plan["tokens"] = tokens.to_dict()
    print(json.dumps(plan, indent=2) if args.json else
          "\n".join([format_plan(inp, plan, title=args.config), ""] + format_tokens(tokens)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
