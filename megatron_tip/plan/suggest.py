"""``--suggest``: the fastest per-role layouts that fit the given cluster (docs/planner.md).

Searched: the student's TP x PP (DP = the rest), the teacher's own TP x PP or the student's, teacher
offload, the rollout engine (vLLM needs the student at PP = 1) and the vLLM engines' TP, and the
memory knobs that trade time for memory (activation recomputation, vLLM sleep mode); the
distributed optimizer is on wherever DP > 1 (less memory and, in this model, less time). Every
candidate passes the trainer's layout checks; a candidate fits when its peak leaves the report's
headroom (not "tight") and an offloaded teacher fits the host memory.
"""
from __future__ import annotations

from typing import Any, Optional

from megatron_tip.models.spec import ModelSpec, check_model_parallel
from megatron_tip.plan.inputs import PlanInputs
from megatron_tip.plan.memory import plan_memory
from megatron_tip.plan.report import TIGHT, build_plan
from megatron_tip.plan.roles import host_bytes_per_node
from megatron_tip.run_checks import check_recompute

GiB = 2**30
RECOMPUTE = ("none", "selective", "full")
TIE = 0.01  # step estimates this close to the fastest count as equally fast


def _divides(spec: ModelSpec, *, tp: int, pp: int) -> bool:
    try:
        check_model_parallel(spec, tp=tp, pp=pp)
    except ValueError:
        return False
    return True


def _pairs(world: int, per_node: int) -> list[tuple[int, int]]:
    """(TP, PP) with TP x PP dividing the world and TP inside one node."""
    return [(t, p) for t in range(1, per_node + 1) for p in range(1, world + 1)
            if world % (t * p) == 0 and per_node % t == 0]


def candidates(inp: PlanInputs, cfg: Any) -> list[tuple[PlanInputs, dict[str, Any]]]:
    """Every layout of the search on ``inp``'s cluster: (inputs, the config overrides that make it)."""
    lay = inp.layout
    world, per_node = lay.world, lay.gpus_per_node
    prompts, samples = int(cfg.train.prompts_per_step), int(cfg.rollout.samples_per_prompt)
    pairs = _pairs(world, per_node)
    out = []
    for tp, pp in pairs:
        dp = world // (tp * pp)
        if prompts % dp or not _divides(inp.student, tp=tp, pp=pp):
            continue
        rollouts = prompts // dp * samples
        mbs = min(int(cfg.train.micro_batch_size), rollouts)
        teachers = [(0, 0)] + [(t, p) for t, p in pairs if (t, p) != (tp, pp)]
        engines = (["vllm"] if pp == 1 else []) + ["megatron"]
        for t_tp, t_pp in teachers:
            if not _divides(inp.teacher, tp=t_tp or tp, pp=t_pp or pp):
                continue
            for engine in engines:
                # vLLM engines: a divisor of the student's TP (each student TP group holds whole
                # engines; what the vLLM engine implements, rollout/colocated.py)
                r_tps = [r for r in range(1, tp + 1) if tp % r == 0
                         and inp.student.num_attention_heads % r == 0] if engine == "vllm" else [0]
                for r_tp in r_tps:
                    for offload in (False, True):
                        for sleep in ((0, 1) if engine == "vllm" else (inp.settings.vllm_sleep_level,)):
                            for rec in RECOMPUTE:
                                try:
                                    check_recompute(_Recompute(rec, cfg.student), num_layers=inp.student.num_layers,
                                                    pp=pp)
                                except ValueError:
                                    continue
                                cand = inp.with_(
                                    tp=tp, pp=pp, dp=dp, teacher_tp=t_tp, teacher_pp=t_pp,
                                    rollout_tp=r_tp if r_tp != tp else 0, rollouts=rollouts, micro_batch=mbs,
                                    rollout_engine=engine,
                                    rollout_micro_batch=min(int(cfg.rollout.micro_batch_size) or rollouts, rollouts),
                                    teacher_offload=offload, vllm_sleep_level=sleep, recompute_granularity=rec,
                                    distributed_optimizer=dp > 1 or inp.settings.distributed_optimizer)
                                out.append((cand, _overrides(cfg, cand)))
    return out


class _Recompute:
    """A ModelConfig-like view with another recompute granularity (for check_recompute)."""

    def __init__(self, granularity: str, mc: Any) -> None:
        self.recompute_granularity = granularity
        self.recompute_method, self.recompute_num_layers = mc.recompute_method, mc.recompute_num_layers


def _overrides(cfg: Any, inp: PlanInputs) -> dict[str, Any]:
    """The dotted config keys (trainer keys) whose values make ``inp`` from ``cfg``, all of them."""
    lay, st, w = inp.layout, inp.settings, inp.workload
    return {"parallel.tensor_parallel": lay.tp, "parallel.pipeline_parallel": lay.pp,
            "teacher.parallel.tensor_parallel": lay.teacher_tp, "teacher.parallel.pipeline_parallel": lay.teacher_pp,
            "teacher.offload": st.teacher_offload, "rollout.engine": w.rollout_engine,
            "rollout.tensor_parallel": lay.rollout_tp, "rollout.vllm_sleep_level": st.vllm_sleep_level,
            "student.recompute_granularity": st.recompute_granularity,
            "optim.distributed_optimizer": st.distributed_optimizer}


def current_values(cfg: Any) -> dict[str, Any]:
    """The same keys as ``_overrides``, read from ``cfg`` (0 where a role's size equals the student's)."""
    tp, pp = cfg.parallel.tensor_parallel, cfg.parallel.pipeline_parallel
    t_tp, t_pp = cfg.teacher.parallel.resolved(tensor_parallel=tp, pipeline_parallel=pp)
    same = (t_tp, t_pp) == (tp, pp)
    r_tp = cfg.rollout.tensor_parallel
    return {"parallel.tensor_parallel": tp, "parallel.pipeline_parallel": pp,
            "teacher.parallel.tensor_parallel": 0 if same else t_tp,
            "teacher.parallel.pipeline_parallel": 0 if same else t_pp,
            "teacher.offload": bool(cfg.teacher.offload), "rollout.engine": cfg.rollout.engine,
            "rollout.tensor_parallel": 0 if cfg.rollout.engine != "vllm" or r_tp in (0, tp) else r_tp,
            "rollout.vllm_sleep_level": cfg.rollout.vllm_sleep_level,
            "student.recompute_granularity": cfg.student.recompute_granularity,
            "optim.distributed_optimizer": bool(cfg.optim.distributed_optimizer)}


def _fits(inp: PlanInputs, plan: dict[str, Any]) -> bool:
    host_ok = inp.device is None or host_bytes_per_node(inp) <= inp.device.host_memory_bytes
    return bool(plan.get("fits")) and not plan.get("tight") and host_ok


def suggest(inp: PlanInputs, cfg: Any, *, top: int = 5) -> list[dict[str, Any]]:
    """The ``top`` fastest fitting candidates, fastest first: overrides (only keys that change the
    config), step seconds, peak bytes, and the plan."""
    if inp.device is None:
        raise ValueError("--suggest needs a GPU target (--gpu NAME): the search ranks by step time")
    now = current_values(cfg)
    found = []
    cap = inp.device.memory_bytes * (1 - TIGHT)
    for cand, keys in candidates(inp, cfg):
        if max(st.peak for st in plan_memory(cand)) > cap:  # memory first: timing only what fits
            continue
        plan = build_plan(cand)
        if not _fits(cand, plan):
            continue
        seconds = sum(plan["time_s"].values())
        changes = {k: v for k, v in keys.items() if now.get(k) != v}
        found.append({"overrides": changes, "step_s": seconds, "peak_bytes": plan["peak_bytes"], "plan": plan,
                      "inputs": cand})
    found.sort(key=lambda f: (f["step_s"], f["peak_bytes"]))
    if found:  # estimates within TIE of the fastest are one answer to this model: the most headroom first
        best = found[0]["step_s"]
        close = sorted((f for f in found if f["step_s"] <= best * (1 + TIE)), key=lambda f: f["peak_bytes"])
        found = close + [f for f in found if f["step_s"] > best * (1 + TIE)]
    return found[:top]


def override_args(changes: dict[str, Any]) -> list[str]:
    """``key=value`` strings for the command line / a config (booleans lower case)."""
    return [f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in changes.items()]


def format_suggestions(inp: PlanInputs, plan: Optional[dict[str, Any]], found: list[dict[str, Any]]) -> list[str]:
    """The report's ``--suggest`` section: the given config (``plan``; None when it does not run on
    this cluster), then the fastest layouts that fit."""
    lay = inp.layout
    if plan is None:
        given, about = 0.0, "the given layout does not run here"
    else:
        given = sum(plan["time_s"].values())
        fit = "fits" if plan.get("fits") and not plan.get("tight") else "tight" if plan.get("fits") else "does NOT fit"
        about = f"the given config: {given:,.0f} s per step, peak {plan['peak_bytes'] / GiB:.1f} GiB, {fit}"
    lines = [f"Suggested layouts on {lay.world} x {inp.device.name} (fastest first; {about}):"]
    if not found:
        lines.append("  none of the searched layouts fits with 5% headroom")
    for i, f in enumerate(found, 1):
        r = f["plan"]["roles"]
        s, t, ro = r["student"], r["teacher"], r["rollout"]
        speed = f" ({given / f['step_s']:,.1f}x the given)" if given and f["step_s"] else ""
        lines.append(f"  {i}. {f['step_s']:,.0f} s per step{speed}, peak "
                     f"{f['peak_bytes'] / GiB:.1f} GiB in the {f['plan']['peak_phase']} phase: student TP={s['tp']} "
                     f"PP={s['pp']} DP={s['dp']}; teacher TP={t['tp']} PP={t['pp']}"
                     f"{' offloaded' if t['offload'] else ''}; rollout {ro['engine']}"
                     + (f" {ro['engines']} x TP={ro['tp']}" if ro["engine"] == "vllm" else ""))
        lines.append("     " + (" ".join(override_args(f["overrides"])) or "(the given config)"))
    return lines
