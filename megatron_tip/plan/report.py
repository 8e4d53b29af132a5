"""The plan as a dict (for tests and JSON) and as the text the CLI and the trainer print."""
from __future__ import annotations

from typing import Any

from megatron_tip.plan.devices import EFFICIENCY, GRAPH_STEP_OVERHEAD_S, LAUNCH_OVERHEAD_S
from megatron_tip.plan.inputs import PlanInputs
from megatron_tip.plan.memory import (GiB, PHASES, StageMemory, ops_impl, plan_memory, total_params,
                                      vllm_kv_capacity_tokens)
from megatron_tip.plan.roles import (host_bytes_per_node, hidden_transfer, rollout_engines, teacher_offload_bytes,
                                     teacher_rows)
from megatron_tip.plan.timing import step_time

TIGHT = 0.05  # headroom below this fraction of the device is reported as tight


def _notes(inp: PlanInputs) -> list[str]:
    w, lay, st, rt = inp.workload, inp.layout, inp.settings, inp.runtime
    notes = []
    if w.rollout_engine == "megatron" and lay.pp > 1:
        notes.append("rollout.engine=megatron with PP>1 has no KV cache: every new token re-runs the whole "
                     "prefix (quadratic in the response length); use PP=1 (more TP) or the vLLM engine")
    if rt.attention == "flash" and rt.kind == "gpu":
        notes.append("planned with Transformer Engine layers (flash attention; `pip install -e .[te]`): without "
                     "TE, transformer_impl=auto builds megatron's local spec, which keeps [b, heads, S, S] "
                     "attention scores per layer (plan that with --attention unfused)")
    if rt.attention == "unfused" and rt.kind == "gpu":
        notes.append("attention without Transformer Engine keeps [b, heads, S, S] scores per layer")
    if st.sequence_parallel:
        notes.append("parallel.sequence_parallel is refused by the trainer today (the kept-position output layer "
                     "needs full-sequence hidden states); planned as megatron would run it, with the kept "
                     "teacher hidden states unsharded [S, b, H] per rank")
    if st.sequence_parallel and rt.attention != "flash":
        notes.append("parallel.sequence_parallel needs the Transformer Engine layer spec (megatron's torch "
                     "norms refuse it)")
    if w.policy == "quadrants":
        notes.append("selection.policy=quadrants keeps a data-dependent share (paper: Q3 is 3-15% of "
                     "tokens); planned as keep ratio 1.0, the worst case")
    if w.rollout_engine == "vllm" and inp.device is not None:
        cap = vllm_kv_capacity_tokens(inp)
        eng = rollout_engines(inp)
        need = eng["rollouts"] * w.seq_len
        notes.append(f"vLLM KV capacity ~{cap:,} tokens per engine (TP={eng['tp']}) for {need:,} rollout tokens "
                     f"({'all at once' if cap >= need else f'{-(-need // max(cap, 1))} waves'})")
    if w.rollout_engine == "megatron" and lay.rollout_tp:
        notes.append("rollout.tensor_parallel applies to the vLLM engine only: the megatron engine samples in "
                     "the student's layout")
    if st.teacher_offload and inp.device is not None:
        host = host_bytes_per_node(inp)
        if host > inp.device.host_memory_bytes:
            notes.append(f"teacher.offload needs {host / GiB:.0f} GiB of host memory per node, more than the "
                         f"assumed {inp.device.host_memory_bytes / GiB:.0f} GiB")
    return notes


def build_plan(inp: PlanInputs) -> dict[str, Any]:
    """Memory per stage and phase, the peak, fit, and the step-time split (when a device is set)."""
    stages = plan_memory(inp)
    worst = max(stages, key=lambda s: s.peak)
    lay = inp.layout
    out: dict[str, Any] = {
        "layout": {"tp": lay.tp, "pp": lay.pp, "dp": lay.dp, "nodes": lay.nodes, "world": lay.world,
                   "gpu": inp.device.name if inp.device else "cpu"},
        "stages": [{"stage": s.stage, "persistent": s.persistent, "phases": s.phases,
                    "totals": {p: s.total(p) for p in s.phases}, "peak_phase": s.peak_phase, "peak": s.peak}
                   for s in stages],
        "worst_stage": worst.stage, "peak_phase": worst.peak_phase, "peak_bytes": worst.peak,
        "notes": _notes(inp),
        "roles": roles(inp),
    }
    cap = inp.device.memory_bytes if inp.device is not None else host_memory_bytes() if inp.runtime.kind == "cpu" else 0
    if cap:  # a CPU run is checked against this machine's RAM, shared by its ranks; it has no step-time model
        need = worst.peak * (lay.world if inp.device is None else 1)
        out.update(capacity_bytes=cap, headroom_bytes=cap - need, fits=need <= cap, tight=0 <= cap - need < TIGHT * cap)
    if inp.device is not None:
        out.update(time_s=step_time(inp))
    return out


def roles(inp: PlanInputs) -> dict[str, Any]:
    """Each role's layout and what crosses between them (JSON-friendly)."""
    lay, w = inp.layout, inp.workload
    eng = rollout_engines(inp)
    return {
        "student": {"tp": lay.tp, "pp": lay.pp, "dp": lay.dp},
        "teacher": {"tp": lay.t_tp, "pp": lay.t_pp, "dp": lay.t_dp, "own_layout": lay.teacher_own,
                    "rows_per_dp_rank": teacher_rows(inp), "offload": inp.settings.teacher_offload,
                    "offload_bytes_per_gpu": teacher_offload_bytes(inp),
                    "host_bytes_per_node": host_bytes_per_node(inp),
                    "hidden_recv_bytes_per_rank": hidden_transfer(inp)["recv"]},
        "rollout": {"engine": w.rollout_engine, "tp": eng["tp"], "engines": eng["count"],
                    "rollouts_per_engine": eng["rollouts"],
                    "cuda_graphs": w.rollout_engine == "vllm" and not inp.settings.vllm_enforce_eager},
    }


def role_lines(inp: PlanInputs) -> list[str]:
    """The report's per-role layout lines."""
    r = roles(inp)
    t, ro = r["teacher"], r["rollout"]
    size = lambda n: f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / 2**20:.1f} MiB"  # noqa: E731
    teacher = (f"  teacher  TP={t['tp']} PP={t['pp']} DP={t['dp']} "
               + ("(own layout, same ranks, time-shared: scores "
                  f"{t['rows_per_dp_rank']} sequences per DP rank, sends each student DP rank its rows, "
                  f"{size(t['hidden_recv_bytes_per_rank'])} per receiving rank; output layer in the "
                  f"student's TP layout)" if t["own_layout"] else "(the student's layout)"))
    if t["offload"]:
        per = "GPU" if inp.device is not None else "process"
        teacher += (f"; offload: {size(t['offload_bytes_per_gpu'])} per {per} in host memory outside the "
                    f"scoring pass ({size(t['host_bytes_per_node'])} per node)")
    if ro["engine"] == "vllm":
        mode = "CUDA graphs" if ro["cuda_graphs"] else "eager (enforce_eager)"
        rollout = (f"  rollout  vllm: {ro['engines']} engine(s) x TP={ro['tp']}, {ro['rollouts_per_engine']} "
                   f"rollouts each, {mode}")
    else:
        rollout = (f"  rollout  megatron engine in the student's layout, {inp.workload.rollout_micro_batch} "
                   f"rollouts at a time per DP rank, eager")
    return [teacher, rollout]


def host_memory_bytes() -> int:
    """This machine's physical memory (0 where the OS does not say)."""
    import os

    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def _params(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def _gib(n: float) -> str:
    return f"{n / GiB:7.2f}"


def _stage_table(st: StageMemory) -> list[str]:
    phases = [p for p in PHASES if p in st.phases]
    names = list(st.persistent) + [k for p in phases for k in st.phases[p] if k not in st.persistent]
    names = list(dict.fromkeys(names))
    width = max(len(n) for n in names + ["total"]) + 2
    lines = [f"  {'GiB':<{width}}" + "".join(f"{p:>11}" for p in phases)]
    for n in names:
        cells = []
        for p in phases:
            v = st.persistent.get(n, 0) + st.phases[p].get(n, 0)
            cells.append(f"{_gib(v):>11}" if v else f"{'-':>11}")
        lines.append(f"  {n:<{width}}" + "".join(cells))
    lines.append(f"  {'total':<{width}}" + "".join(f"{_gib(st.total(p)):>11}" for p in phases))
    return lines


def format_plan(inp: PlanInputs, plan: dict[str, Any], *, title: str = "") -> str:
    w, lay, st = inp.workload, inp.layout, inp.settings
    s_n, t_n = total_params(inp.student), total_params(inp.teacher)
    dev = inp.device
    where = f"{lay.world} x {dev.name} ({lay.nodes} node{'s' if lay.nodes > 1 else ''})" if dev else \
        f"this machine's CPU, {lay.world} process{'es' if lay.world > 1 else ''}"
    kept = int(w.kept_per_microbatch() / w.micro_batch)
    lines = [f"TIP step plan{': ' + title if title else ''}",
             f"  student  {_params(s_n)} params, {inp.student_dtype}  <- {inp.student_source}",
             f"  teacher  {_params(t_n)} params, {inp.teacher_dtype}  <- {inp.teacher_source}",
             f"  layout   {where}: TP={lay.tp} PP={lay.pp} DP={lay.dp}, sequence parallel "
             f"{'on' if st.sequence_parallel else 'off'}",
             *role_lines(inp),
             f"  memory   recompute {st.recompute_granularity}"
             + (f" ({st.recompute_method}, {st.recompute_num_layers} layer(s))" if st.recompute_granularity == "full"
                else "")
             + f", distributed optimizer {'on' if st.distributed_optimizer else 'off'}, "
             f"attention {inp.runtime.attention if dev else 'unfused (megatron local layers on CPU)'}, "
             f"rollout {w.rollout_engine}"
             + (f" (gpu_memory_utilization {w.vllm_gpu_memory_utilization}, sleep level {st.vllm_sleep_level})"
                if w.rollout_engine == "vllm" else
                f" (micro-batch {w.rollout_micro_batch})" if w.rollout_engine == "megatron" else ""),
             f"  step     {w.rollouts} sequences per DP rank x {w.seq_len} tokens (worst case: prompt "
             f"{w.prompt_len} + response {w.response_len}), {w.num_microbatches} micro-batch(es) of {w.micro_batch}; "
             f"keep ratio {w.keep_ratio:g} -> {kept} of {w.response_len} positions per sequence in the gradient pass; "
             f"scoring logits {w.score_chunk_tokens} rows at a time; gradient-pass output layer "
             f"{'fused into the reverse KL' if w.fused_output_layer else 'unfused ([n_kept, V/TP] logits)'}, "
             f"ops kernels {ops_impl(inp)}", ""]
    for s in plan["stages"]:
        sm = StageMemory(s["stage"], s["persistent"], s["phases"])
        worst = " (worst)" if s["stage"] == plan["worst_stage"] and lay.pp > 1 else ""
        per = "Per-GPU" if dev else "Per-process"
        lines += [f"{per} memory, pipeline stage {s['stage']} of {lay.pp}{worst}"] + _stage_table(sm) + [""]
    peak = plan["peak_bytes"]
    verdict = f"peak {peak / GiB:.2f} GiB in the {plan['peak_phase']} phase"
    if "capacity_bytes" in plan:
        head, cap = plan["headroom_bytes"], plan["capacity_bytes"] / GiB
        of = f"of {cap:.2f} GiB" if dev else (f"x {lay.world} processes of {cap:.2f} GiB RAM" if lay.world > 1
                                              else f"of {cap:.2f} GiB RAM")
        verdict += (f" {of} -> FITS ({head / GiB:.2f} GiB free{', tight' if plan['tight'] else ''})" if plan["fits"]
                    else f" {of} -> DOES NOT FIT (short by {-head / GiB:.2f} GiB)")
    if dev is None:
        verdict += "; no step-time estimate on CPU (the planner's timing models GPUs)"
    lines.append(verdict)
    if "time_s" in plan:
        t = plan["time_s"]
        lines += ["", f"Step time estimate: {sum(t.values()):.0f} s per step"]
        lines += [f"  {k:<28}{v:9.1f} s" for k, v in t.items()]
        graphs = w.rollout_engine == "vllm" and not st.vllm_enforce_eager
        decode = (f"CUDA-graph decode {GRAPH_STEP_OVERHEAD_S * 1e3:.2f} ms host cost per token" if graphs else
                  f"eager decode {LAUNCH_OVERHEAD_S[w.rollout_engine if w.rollout_engine in LAUNCH_OVERHEAD_S else 'megatron'] * 1e3:.2f}"
                  f" ms launch cost per layer per token")
        lines.append(f"  assumptions: GEMM at {EFFICIENCY['gemm']:.0%} of peak bf16, streaming at "
                     f"{EFFICIENCY['hbm']:.0%} of HBM, links at {EFFICIENCY['link']:.0%}; {decode}; no overlap")
    for n in plan["notes"]:
        lines.append(f"note: {n}")
    return "\n".join(lines)
