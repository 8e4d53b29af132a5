"""Step-time estimate from FLOPs, bytes moved and the device figures (formulas: docs/planner.md).

Compute-bound work (GEMMs, attention) runs at ``EFFICIENCY['gemm']`` of peak bf16 FLOP/s,
streaming work (token statistics, the loss, the optimizer, decode-time weight and KV reads) at
``EFFICIENCY['hbm']`` of HBM bandwidth, collectives and host copies at ``EFFICIENCY['link']`` of
the link. Nothing overlaps (an upper-bound flavour of estimate); the pipeline bubble is
(M + pp - 1) / M for M micro-batches. Eager decode pays a host launch cost per layer per token.
"""
from __future__ import annotations

import math

from megatron_tip.models.spec import ModelSpec
from megatron_tip.plan.devices import COLLECTIVE_LATENCY_S, EFFICIENCY, GRAPH_STEP_OVERHEAD_S, LAUNCH_OVERHEAD_S
from megatron_tip.plan.inputs import DTYPE_BYTES, PlanInputs
from megatron_tip.plan.memory import ops_impl, params_per_rank, total_params
from megatron_tip.plan.roles import (engine_weight_bytes, hidden_transfer, kv_bytes_per_token, rollout_engines,
                                     teacher_microbatches, teacher_offload_bytes, teacher_rows)


def matmul_params_per_layer(spec: ModelSpec) -> int:
    h, d = spec.hidden_size, spec.head_dim
    a, g = spec.num_attention_heads, spec.num_query_groups
    return h * (a + 2 * g) * d + a * d * h + 3 * h * spec.ffn_hidden_size


def forward_flops(spec: ModelSpec, *, tokens: float, context: float, logits_tokens: float, vocab: int) -> float:
    """Forward FLOPs of the whole model: GEMMs at ``tokens`` positions, attention over an average
    ``context`` keys per query, the output layer at ``logits_tokens`` positions."""
    per_layer = 2 * matmul_params_per_layer(spec) + 4 * spec.num_attention_heads * spec.head_dim * context
    return spec.num_layers * per_layer * tokens + 2 * spec.hidden_size * vocab * logits_tokens


def _gemm_s(inp: PlanInputs, flops: float, *, bubble: float = 1.0, ranks: int = 0) -> float:
    """GEMM seconds of ``flops`` split over ``ranks`` GPUs (default: the student's TP x PP)."""
    lay = inp.layout
    return flops / (ranks or lay.tp * lay.pp) / (inp.device.bf16_flops * EFFICIENCY["gemm"]) * bubble


def _hbm_s(inp: PlanInputs, nbytes: float) -> float:
    return nbytes / (inp.device.hbm_bytes_s * EFFICIENCY["hbm"])


def _tp_comm_s(inp: PlanInputs, spec: ModelSpec, tokens: float, collectives_per_layer: int, act: int,
               *, tp: int = 0, pp: int = 0) -> float:
    """Ring all-reduces of [tokens, h] per layer inside the TP group (each GPU sends 2(t-1)/t)."""
    t = tp or inp.layout.tp
    if t == 1:
        return 0.0
    nbytes = tokens * spec.hidden_size * act * 2 * (t - 1) / t
    layers = spec.num_layers / (pp or inp.layout.pp)
    return layers * collectives_per_layer * nbytes / (inp.device.nvlink_bytes_s * EFFICIENCY["link"])


def _context(inp: PlanInputs, length: int) -> float:
    return (length + 1) / 2 if inp.runtime.attention == "flash" else length  # flash skips masked blocks


def _scoring(inp: PlanInputs, spec: ModelSpec, dtype: str, *, stats: bool) -> float:
    w = inp.workload
    rows = w.num_microbatches * w.micro_batch
    tokens = rows * w.seq_len
    bubble = (w.num_microbatches + inp.layout.pp - 1) / w.num_microbatches
    flops = forward_flops(spec, tokens=tokens, context=_context(inp, w.seq_len), logits_tokens=tokens,
                          vocab=inp.padded_vocab)
    s = _gemm_s(inp, flops, bubble=bubble) + _tp_comm_s(inp, spec, tokens, 2, DTYPE_BYTES[dtype])
    if stats:  # token stats: eager ~2 reads of both logits shards + ~68 B of fp32 buffer traffic per
        # element; compiled: one fused read of both (no fp32 temporaries)
        act = DTYPE_BYTES[inp.student_dtype] + DTYPE_BYTES[inp.teacher_dtype]
        per = 2 * act + 68 if ops_impl(inp) == "eager" else act
        s += _hbm_s(inp, tokens * inp.padded_vocab / inp.layout.tp * per)
    return s


def _teacher_scoring(inp: PlanInputs) -> float:
    """The teacher's forward: in the student's layout as the student's; in its own layout its
    backbone over its DP share of the global batch on TP_T x PP_T GPUs, and its output layer (held
    in the student's TP layout) over the student's rows on the student's ranks."""
    lay, w, t = inp.layout, inp.workload, inp.teacher
    if not lay.teacher_own:
        return _scoring(inp, t, inp.teacher_dtype, stats=False)
    m_t = teacher_microbatches(inp)
    tokens_t = teacher_rows(inp) * w.seq_len
    backbone = forward_flops(t, tokens=tokens_t, context=_context(inp, w.seq_len), logits_tokens=0,
                             vocab=inp.padded_vocab)
    sec = _gemm_s(inp, backbone, bubble=(m_t + lay.t_pp - 1) / m_t, ranks=lay.t_tp * lay.t_pp)
    sec += _tp_comm_s(inp, t, tokens_t, 2, DTYPE_BYTES[inp.teacher_dtype], tp=lay.t_tp, pp=lay.t_pp)
    tokens_s = w.num_microbatches * w.micro_batch * w.seq_len
    head = 2 * t.hidden_size * inp.padded_vocab * tokens_s
    return sec + _gemm_s(inp, head, bubble=(w.num_microbatches + lay.pp - 1) / w.num_microbatches)


def _hidden_transfer(inp: PlanInputs) -> float:
    """Teacher -> student hidden states (own layout): NVLink in a node, InfiniBand across nodes."""
    moved = max(hidden_transfer(inp).values())
    link = inp.device.internode_bytes_s if inp.layout.nodes > 1 else inp.device.nvlink_bytes_s
    return moved / (link * EFFICIENCY["link"])


def _teacher_offload(inp: PlanInputs) -> float:
    """Host -> device copy of the offloaded teacher each step; nothing goes back (frozen weights:
    the host copy stays valid and the device copy is dropped)."""
    return teacher_offload_bytes(inp) / (inp.device.pcie_bytes_s * EFFICIENCY["link"])


def _gradient(inp: PlanInputs) -> float:
    w, lay, st, s = inp.workload, inp.layout, inp.settings, inp.student
    rows = w.num_microbatches * w.micro_batch
    tokens = rows * w.seq_len
    kept = w.num_microbatches * w.kept_per_microbatch()
    ctx = _context(inp, w.seq_len)
    backbone = forward_flops(s, tokens=tokens, context=ctx, logits_tokens=0, vocab=inp.padded_vocab)
    passes = 3.0 + (1.0 if st.recompute_granularity == "full" else 0.0)
    # selective recomputation re-runs core attention's forward once more
    attn = s.num_layers * 4 * s.num_attention_heads * s.head_dim * ctx * tokens
    recomputed = attn if st.recompute_granularity == "selective" else 0.0
    out_layer = 3 * 2 * s.hidden_size * inp.padded_vocab * kept + 2 * inp.teacher.hidden_size * inp.padded_vocab * kept
    bubble = (w.num_microbatches + lay.pp - 1) / w.num_microbatches
    act = DTYPE_BYTES[inp.student_dtype]
    t = _gemm_s(inp, passes * backbone + recomputed + out_layer, bubble=bubble)
    t += _tp_comm_s(inp, s, tokens, 4 + (2 if st.recompute_granularity == "full" else 0), act)
    # logits written, read by the stats and the gradient kernels (fused or not: a 64 MiB chunk does
    # not stay in cache), + the eager kernels' fp32 buffer traffic; same FLOPs either way
    fp32 = 110 if ops_impl(inp) == "eager" else 0
    t += _hbm_s(inp, kept * inp.padded_vocab / lay.tp * (3 * (act + DTYPE_BYTES[inp.teacher_dtype]) + fp32))
    # data-parallel gradient reduction and the optimizer step (per stage, worst stage)
    n = max(params_per_rank(s, tp=lay.tp, pp=lay.pp, pp_rank=p, padded_vocab=inp.padded_vocab)
            for p in range(lay.pp))
    if lay.dp > 1:
        link = inp.device.internode_bytes_s if lay.nodes > 1 else inp.device.nvlink_bytes_s
        frac = (lay.dp - 1) / lay.dp
        vol = n * 4 * frac + (n * act * frac if st.distributed_optimizer else n * 4 * frac)
        t += vol / (link * EFFICIENCY["link"])
    shard = lay.dp if st.distributed_optimizer else 1
    t += _hbm_s(inp, n / shard * 30)  # fp32 main param, m, v read+write, grad read, bf16 param write
    return t


def _rollout(inp: PlanInputs) -> float:
    """One engine's share of the step's rollouts: waves of prefill + decode steps.

    vLLM: engines of TP_R ranks (``rollout.tensor_parallel``), as many waves as its KV cache needs;
    a decode step pays a launch per layer when eager, one graph replay with CUDA graphs. Megatron:
    the student's layout, ``rollout.micro_batch_size`` rows at a time, eager; PP > 1 re-runs the prefix.
    """
    w, lay, s = inp.workload, inp.layout, inp.student
    act = DTYPE_BYTES[inp.student_dtype]
    layers = s.num_layers
    eng = rollout_engines(inp)
    steps = w.response_len
    if w.rollout_engine == "vllm":
        from megatron_tip.plan.memory import vllm_kv_capacity_tokens

        tp, pp = eng["tp"], 1
        weights, kv_token = engine_weight_bytes(inp), kv_bytes_per_token(inp, tp=tp)
        need = eng["rollouts"] * w.seq_len
        cap = max(1, vllm_kv_capacity_tokens(inp))
        waves, batch = math.ceil(need / cap), min(eng["rollouts"], max(1, cap // w.seq_len))
        step_overhead = layers * LAUNCH_OVERHEAD_S["vllm"] if inp.settings.vllm_enforce_eager \
            else GRAPH_STEP_OVERHEAD_S
    else:
        tp, pp = lay.tp, lay.pp
        weights = params_per_rank(s, tp=tp, pp=1, pp_rank=0, padded_vocab=inp.padded_vocab) * act / pp
        kv_token = kv_bytes_per_token(inp, tp=tp) / pp
        batch = w.rollout_micro_batch
        waves = math.ceil(w.rollouts / batch)
        overhead = LAUNCH_OVERHEAD_S["megatron"]
        step_overhead = layers / pp * overhead
    prefill = forward_flops(s, tokens=batch * w.prompt_len, context=_context(inp, w.prompt_len),
                            logits_tokens=batch, vocab=inp.padded_vocab)
    if w.rollout_engine == "megatron" and lay.pp > 1:
        # no KV cache: every new token re-runs the whole prefix; the stages run one after another
        tokens = batch * (steps * w.prompt_len + steps * (steps + 1) / 2)
        flops = forward_flops(s, tokens=tokens, context=_context(inp, w.seq_len), logits_tokens=batch * steps,
                              vocab=inp.padded_vocab)
        per_wave = flops / tp / (inp.device.bf16_flops * EFFICIENCY["gemm"]) + steps * layers * overhead
        return waves * per_wave
    ctx = w.prompt_len + steps / 2
    decode_bytes = weights + batch * ctx * kv_token
    decode_flops = forward_flops(s, tokens=batch, context=ctx, logits_tokens=batch, vocab=inp.padded_vocab)
    per_step = max(_hbm_s(inp, decode_bytes), decode_flops / tp / (inp.device.bf16_flops * EFFICIENCY["gemm"]))
    per_step += step_overhead + (2 * layers * COLLECTIVE_LATENCY_S if tp > 1 else 0.0)
    per_wave = _gemm_s(inp, prefill, ranks=tp * pp) * pp + steps * per_step
    return waves * per_wave


def _weight_sync(inp: PlanInputs) -> float:
    """Training layout (TP) -> engine layout (TP_R), bucketed on the GPU (no full host copy):
    each rank all-gathers every tensor from its TP group bucket by bucket (NVLink), the engine
    copies its TP_R shard into its weights (HBM), and with sleep level 1 its weights go to host and
    back every step (PCIe)."""
    if inp.workload.rollout_engine != "vllm":
        return 0.0  # the megatron engine samples with the training weights themselves
    lay, s = inp.layout, inp.student
    total = total_params(s) * DTYPE_BYTES[inp.student_dtype]
    link = EFFICIENCY["link"]
    gather = total * (lay.tp - 1) / lay.tp / (inp.device.nvlink_bytes_s * link)
    shard = total / lay.r_tp
    load = _hbm_s(inp, 2 * shard)  # read the gathered bucket's shard, write the engine's weight
    sleep = 2 * shard / (inp.device.pcie_bytes_s * link) if inp.settings.vllm_sleep_level == 1 else 0.0
    return gather + load + sleep


def step_time(inp: PlanInputs) -> dict[str, float]:
    """Seconds per step by part (per rank; all ranks run in lockstep)."""
    if inp.device is None:
        raise ValueError("step_time needs a device (PlanInputs.device)")
    return {
        "rollout": _rollout(inp),
        "teacher offload (host -> GPU)": _teacher_offload(inp),
        "teacher scoring": _teacher_scoring(inp),
        "teacher hidden transfer": _hidden_transfer(inp),
        "student scoring": _scoring(inp, inp.student, inp.student_dtype, stats=True),
        "gradient pass + optimizer": _gradient(inp),
        "weight sync": _weight_sync(inp),
    }
