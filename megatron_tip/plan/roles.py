"""Per-role quantities of a plan: the teacher in its own TP x PP, teacher offload, the vLLM engines' own TP.

Every role runs on the same ranks, one after another (time-shared). The student is TP x PP x DP;
the teacher TP_T x PP_T x DP_T with DP_T = world / (TP_T x PP_T) scores the global batch (each of
its DP ranks a 1/DP_T share) and its final hidden states go to the student's DP ranks, each
receiving exactly its rows on every rank of its last pipeline stage; the teacher's output layer is
held in the student's TP layout (vocab shards aligned with the student's), on the student's last
stage. vLLM engines of TP_R ranks each: world / TP_R engines, each sampling an equal share of the
step's prompts. Formulas and assumptions: docs/planner.md ("Per-role layouts").
"""
from __future__ import annotations

import math
from typing import Any

from megatron_tip.models.spec import ModelSpec, padded_vocab
from megatron_tip.plan.inputs import DTYPE_BYTES, PlanInputs

GiB = 2**30


def check_rollout_layout(cfg: Any, *, student: ModelSpec, world_size: int) -> None:
    """``rollout.tensor_parallel`` tiles the ranks and divides the student's attention heads (vLLM's
    requirement; KV heads are replicated when TP_R exceeds them). ValueError naming the key."""
    r_tp = int(cfg.rollout.tensor_parallel)
    if not r_tp or cfg.rollout.engine != "vllm":
        return
    key = f"rollout.tensor_parallel={r_tp}"
    if world_size % r_tp:
        raise ValueError(f"{key} does not divide the world size {world_size} (one vLLM engine per {r_tp} ranks)")
    if student.num_attention_heads % r_tp:
        raise ValueError(f"{key}: student num_attention_heads={student.num_attention_heads} is not divisible by it")


def global_rollouts(inp: PlanInputs) -> int:
    return inp.workload.rollouts * inp.layout.dp


def teacher_rows(inp: PlanInputs) -> int:
    """Sequences one teacher DP rank scores (the student's per-rank rollouts in the same layout)."""
    if not inp.layout.teacher_own:
        return inp.workload.rollouts
    return math.ceil(global_rollouts(inp) / inp.layout.t_dp)


def teacher_microbatches(inp: PlanInputs) -> int:
    return math.ceil(teacher_rows(inp) / inp.workload.micro_batch)


def teacher_padded_vocab(inp: PlanInputs) -> int:
    """Rows of the teacher's embedding in its own TP (the output layer uses the student's padding)."""
    return padded_vocab(max(inp.student.vocab_size, inp.teacher.vocab_size), tp=inp.layout.t_tp)


def teacher_weight_bytes(inp: PlanInputs, stage: int) -> int:
    """Teacher bytes on a rank of student pipeline stage ``stage``.

    Same layout: the teacher's share of that stage (as megatron builds it). Own layout: the largest
    teacher stage's body (embedding on its first stage, final norm on its last; which teacher stage a
    rank holds is the teacher's mapping, so the worst is taken) plus, on the student's last stage,
    the output layer's [V_p / TP, H_T] shard in the student's TP layout.
    """
    from megatron_tip.plan.memory import params_per_rank

    lay, t = inp.layout, inp.teacher
    beta = DTYPE_BYTES[inp.teacher_dtype]
    if not lay.teacher_own:
        return params_per_rank(t, tp=lay.tp, pp=lay.pp, pp_rank=stage, padded_vocab=inp.padded_vocab) * beta
    pv = teacher_padded_vocab(inp)
    body = max(params_per_rank(t, tp=lay.t_tp, pp=lay.t_pp, pp_rank=q, padded_vocab=pv, output_layer=False)
               for q in range(lay.t_pp))
    head = inp.padded_vocab // lay.tp * t.hidden_size if stage == lay.pp - 1 else 0
    return (body + head) * beta


def teacher_offload_bytes(inp: PlanInputs) -> int:
    """Bytes per GPU moved host -> device each step when the teacher is offloaded (its largest share)."""
    if not inp.settings.teacher_offload:
        return 0
    return max(teacher_weight_bytes(inp, p) for p in range(inp.layout.pp))


def host_bytes_per_node(inp: PlanInputs) -> int:
    """Host memory the offloaded teacher takes on one node (pinned copies of its ranks' shares)."""
    return teacher_offload_bytes(inp) * min(inp.layout.world, inp.layout.gpus_per_node)


def hidden_bytes(inp: PlanInputs, rows: int) -> int:
    """Final hidden states [rows, S, H_T] of the teacher."""
    return rows * inp.workload.seq_len * inp.teacher.hidden_size * DTYPE_BYTES[inp.teacher_dtype]


def hidden_transfer(inp: PlanInputs) -> dict[str, int]:
    """Bytes of the teacher -> student redistribution of final hidden states (own layout only).

    recv: what one rank of a student DP group's last stage receives (its rows, micro-batch padded);
    send: the total (every last-stage rank of every student DP group) spread over the teacher's
    last-stage ranks (TP_T x DP_T: every TP rank of a teacher stage holds the whole hidden state).
    """
    if not inp.layout.teacher_own:
        return {"recv": 0, "send": 0}
    lay, w = inp.layout, inp.workload
    recv = hidden_bytes(inp, w.num_microbatches * w.micro_batch)
    total = recv * lay.tp * lay.dp
    return {"recv": recv, "send": math.ceil(total / (lay.t_tp * lay.t_dp))}


def rollout_engines(inp: PlanInputs) -> dict[str, int]:
    """tp, count and rollouts per engine. vLLM: world / TP_R engines, each an equal share of the
    prompts (whole prompts: its n samples stay together); megatron: the student's DP replicas."""
    lay, w = inp.layout, inp.workload
    if w.rollout_engine != "vllm":
        return {"tp": lay.tp, "count": lay.dp, "rollouts": w.rollouts}
    count = lay.world // lay.r_tp
    prompts = w.prompts or global_rollouts(inp)
    return {"tp": lay.r_tp, "count": count,
            "rollouts": math.ceil(prompts / count) * (w.samples_per_prompt if w.prompts else 1)}


def engine_weight_bytes(inp: PlanInputs) -> int:
    """The student's weights on one rank of a vLLM engine (TP_R shards, vocab padded for TP_R)."""
    from megatron_tip.plan.memory import params_per_rank

    r = inp.layout.r_tp
    pv = padded_vocab(max(inp.student.vocab_size, inp.teacher.vocab_size), tp=r)
    return params_per_rank(inp.student, tp=r, pp=1, pp_rank=0, padded_vocab=pv) * DTYPE_BYTES[inp.student_dtype]


def kv_bytes_per_token(inp: PlanInputs, *, tp: int) -> float:
    """KV cache bytes of one token on one rank of a TP group (KV heads replicated past their count)."""
    s = inp.student
    return 2 * s.num_layers * max(1.0, s.num_query_groups / tp) * s.head_dim * DTYPE_BYTES[inp.student_dtype]
