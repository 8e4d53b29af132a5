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
from megatron_tip.plan.devices import COLLECTIVE_LATENCY_S, EFFICIENCY, LAUNCH_OVERHEAD_S
from megatron_tip.plan.inputs import DTYPE_BYTES, PlanInputs
from megatron_tip.plan.memory import ops_impl, params_per_rank, total_params


def matmul_params_per_layer(spec: ModelSpec) -> int:
    h, d = spec.hidden_size, spec.head_dim
    a, g = spec.num_attention_heads, spec.num_query_groups
    return h * (a + 2 * g) * d + a * d * h + 3 * h * spec.ffn_hidden_size


def forward_flops(spec: ModelSpec, *, tokens: float, context: float, logits_tokens: float, vocab: int) -> float:
    """Forward FLOPs of the whole model: GEMMs at ``tokens`` positions, attention over an average
    ``context`` keys per query, the output layer at ``logits_tokens`` positions."""
    per_layer = 2 * matmul_params_per_layer(spec) + 4 * spec.num_attention_heads * spec.head_dim * context
    return spec.num_layers * per_layer * tokens + 2 * spec.hidden_size * vocab * logits_tokens


def _gemm_s(inp: PlanInputs, flops: float, *, bubble: float = 1.0) -> float:
    lay = inp.layout
    return flops / (lay.tp * lay.pp) / (inp.device.bf16_flops * EFFICIENCY["gemm"]) * bubble


def _hbm_s(inp: PlanInputs, nbytes: float) -> float:
    return nbytes / (inp.device.hbm_bytes_s * EFFICIENCY["hbm"])


def _tp_comm_s(inp: PlanInputs, spec: ModelSpec, tokens: float, collectives_per_layer: int, act: int) -> float:
    """Ring all-reduces of [tokens, h] per layer inside the TP group (each GPU sends 2(t-1)/t)."""
    t = inp.layout.tp
    if t == 1:
        return 0.0
    nbytes = tokens * spec.hidden_size * act * 2 * (t - 1) / t
    layers = spec.num_layers / inp.layout.pp
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
    w, lay, s = inp.workload, inp.layout, inp.student
    act = DTYPE_BYTES[inp.student_dtype]
    layers = s.num_layers
    weights = params_per_rank(s, tp=lay.tp, pp=1, pp_rank=0, padded_vocab=inp.padded_vocab) * act / lay.pp
    kv_token = 2 * layers * max(1.0, s.num_query_groups / lay.tp) * s.head_dim * act / lay.pp
    steps = w.response_len
    if w.rollout_engine == "vllm":
        from megatron_tip.plan.memory import vllm_kv_capacity_tokens

        need = w.rollouts * w.seq_len
        cap = max(1, vllm_kv_capacity_tokens(inp))
        waves, batch = math.ceil(need / cap), min(w.rollouts, max(1, cap // w.seq_len))
        overhead = LAUNCH_OVERHEAD_S["vllm"]
    else:
        batch = w.rollout_micro_batch
        waves = math.ceil(w.rollouts / batch)
        overhead = LAUNCH_OVERHEAD_S["megatron"]
    prefill = forward_flops(s, tokens=batch * w.prompt_len, context=_context(inp, w.prompt_len),
                            logits_tokens=batch, vocab=inp.padded_vocab)
    if w.rollout_engine == "megatron" and lay.pp > 1:
        # no KV cache: every new token re-runs the whole prefix; the stages run one after another
        tokens = batch * (steps * w.prompt_len + steps * (steps + 1) / 2)
        flops = forward_flops(s, tokens=tokens, context=_context(inp, w.seq_len), logits_tokens=batch * steps,
                              vocab=inp.padded_vocab)
        per_wave = flops / lay.tp / (inp.device.bf16_flops * EFFICIENCY["gemm"]) + steps * layers * overhead
        return waves * per_wave
    ctx = w.prompt_len + steps / 2
    decode_bytes = weights + batch * ctx * kv_token
    decode_flops = forward_flops(s, tokens=batch, context=ctx, logits_tokens=batch, vocab=inp.padded_vocab)
    per_step = max(_hbm_s(inp, decode_bytes), decode_flops / lay.tp / (inp.device.bf16_flops * EFFICIENCY["gemm"]))
    per_step += layers / lay.pp * overhead + (2 * layers * COLLECTIVE_LATENCY_S if lay.tp > 1 else 0.0)
    per_wave = _gemm_s(inp, prefill) * lay.pp + steps * per_step
    return waves * per_wave


def _weight_sync(inp: PlanInputs) -> float:
    if inp.workload.rollout_engine != "vllm":
        return 0.0  # the megatron engine samples with the training weights themselves
    lay, s = inp.layout, inp.student
    total = total_params(s) * DTYPE_BYTES[inp.student_dtype]
    link = EFFICIENCY["link"]
    gather = total * (lay.tp - 1) / lay.tp / (inp.device.nvlink_bytes_s * link)
    shard = total / lay.tp / (inp.device.pcie_bytes_s * link)
    sleep = 2 * shard if inp.settings.vllm_sleep_level == 1 else 0.0  # weights to CPU and back every step
    return gather + total / (inp.device.pcie_bytes_s * link) + shard + sleep


def step_time(inp: PlanInputs) -> dict[str, float]:
    """Seconds per step by part (per rank; all ranks run in lockstep)."""
    if inp.device is None:
        raise ValueError("step_time needs a device (PlanInputs.device)")
    return {
        "rollout": _rollout(inp),
        "teacher scoring": _scoring(inp, inp.teacher, inp.teacher_dtype, stats=False),
        "student scoring": _scoring(inp, inp.student, inp.student_dtype, stats=True),
        "gradient pass + optimizer": _gradient(inp),
        "weight sync": _weight_sync(inp),
    }
