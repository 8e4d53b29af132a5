"""Per-GPU memory of one TIP training step, phase by phase (formulas: docs/planner.md).

A step on one rank runs four phases one after another; what one phase allocates is freed
before the next, except the teacher's final hidden states, which the scoring pass keeps for the
gradient pass (and the optimizer step still sees them: the trainer holds the scored batch to
the end of the step). Each phase total = the persistent state (weights, gradients, optimizer
state, runtime) + that phase's transient peak. Everything is per pipeline stage: stage 0
holds the embedding, the last stage the output layer, the logits and the loss.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from megatron_tip.models.spec import ModelSpec
# The ops' own constants (one source): the stats ops' fp32 work buffer per chunk, the fused op's
# [rows, V/TP] fp32 logits chunk, and the shard width from which "auto" compiles.
from megatron_tip.ops.compiled import AUTO_MIN_VOCAB, row_bucket
from megatron_tip.ops.fused_linear_rkl import FUSED_CHUNK_BYTES
from megatron_tip.ops.token_stats import STATS_CHUNK_BYTES as OPS_CHUNK_BYTES
from megatron_tip.plan.activations import attention_score_buffer_bytes, layer_bytes, stage_activation_bytes
from megatron_tip.plan.devices import VLLM_GRAPH_POOL_BYTES
from megatron_tip.plan.inputs import DTYPE_BYTES, PlanInputs
from megatron_tip.plan.roles import (engine_weight_bytes, hidden_bytes, kv_bytes_per_token, teacher_microbatches,
                                     teacher_weight_bytes)

GiB = 2**30
PHASES = ("rollout", "scoring", "gradient", "optimizer")


@dataclass
class StageMemory:
    """Bytes by component: ``persistent`` in every phase, ``phases[p]`` on top during phase p."""

    stage: int
    persistent: dict[str, int] = field(default_factory=dict)
    phases: dict[str, dict[str, int]] = field(default_factory=dict)

    def total(self, phase: str) -> int:
        return sum(self.persistent.values()) + sum(self.phases.get(phase, {}).values())

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.total)

    @property
    def peak(self) -> int:
        return self.total(self.peak_phase)


def layer_params(spec: ModelSpec, *, tp: int) -> int:
    """Parameters of one transformer layer on one TP rank (norms are replicated)."""
    h, d, f = spec.hidden_size, spec.head_dim, spec.ffn_hidden_size
    a, g = spec.num_attention_heads, spec.num_query_groups
    qkv = (a + 2 * g) * d // tp
    n = h * qkv + (qkv if spec.add_qkv_bias else 0) + (a * d // tp) * h + 3 * h * (f // tp) + 2 * h
    return n + (2 * d if spec.qk_layernorm else 0)


def params_per_rank(spec: ModelSpec, *, tp: int, pp: int, pp_rank: int, padded_vocab: int,
                    output_layer: bool = True) -> int:
    """Parameters megatron builds on one (tp, pp) rank, vocab padding included.

    Tied embeddings with PP > 1: the last stage keeps its own copy of the word embeddings as the
    output weight (megatron's shared-embedding group), so both end stages hold one.
    ``output_layer=False``: without the output layer (a teacher in its own layout holds it in the
    student's TP layout instead, ``roles.teacher_weight_bytes``).
    """
    n = spec.num_layers // pp * layer_params(spec, tp=tp)
    emb = padded_vocab // tp * spec.hidden_size
    if pp_rank == 0:
        n += emb
    if pp_rank == pp - 1:
        n += spec.hidden_size + (emb if output_layer and (not spec.tie_word_embeddings or pp > 1) else 0)
    return n


def total_params(spec: ModelSpec) -> int:
    """Parameters of the unsharded, unpadded model (embeddings counted once when tied)."""
    return params_per_rank(spec, tp=1, pp=1, pp_rank=0, padded_vocab=spec.vocab_size)


def largest_param(spec: ModelSpec, *, tp: int, pp: int, pp_rank: int, padded_vocab: int) -> int:
    """Elements of the biggest single parameter tensor on a rank (optimizer temporaries)."""
    h = spec.hidden_size
    biggest = max(h * (spec.num_attention_heads + 2 * spec.num_query_groups) * spec.head_dim // tp,
                  2 * (spec.ffn_hidden_size // tp) * h)
    ends = pp_rank == 0 or pp_rank == pp - 1
    return max(biggest, padded_vocab // tp * h if ends else 0)


def _persistent(inp: PlanInputs, stage: int) -> dict[str, int]:
    lay, st, rt = inp.layout, inp.settings, inp.runtime
    pv = inp.padded_vocab
    n_s = params_per_rank(inp.student, tp=lay.tp, pp=lay.pp, pp_rank=stage, padded_vocab=pv)
    shard = lay.dp if st.distributed_optimizer else 1
    out = {
        # offloaded: in host memory, on the GPU during the scoring pass only (_scoring)
        "teacher weights": 0 if st.teacher_offload else teacher_weight_bytes(inp, stage),
        "student weights": n_s * DTYPE_BYTES[inp.student_dtype],
        "student grads (fp32 buffer)": n_s * 4,
        "student fp32 main params": (n_s * 4 // shard) if inp.student_dtype != "float32" else 0,
        "student Adam state": n_s * 8 // shard,
    }
    w = inp.workload
    if rt.reserve_bytes:
        out["CUDA context / NCCL / cuBLAS"] = rt.reserve_bytes
    if rt.kind == "gpu":  # p2p send/recv tensors between stages; the SP all-gather buffer
        tokens = w.micro_batch * w.seq_len * DTYPE_BYTES[inp.student_dtype]
        h = max(inp.student.hidden_size, inp.teacher.hidden_size)
        # the teacher in its own PP > 1 keeps p2p buffers of its own hidden width
        own_pp = lay.teacher_own and lay.t_pp > 1
        h_pp = max(inp.student.hidden_size if lay.pp > 1 else 0, inp.teacher.hidden_size if own_pp or
                   (lay.pp > 1 and not lay.teacher_own) else 0)
        out["communication buffers (PP p2p, SP gather)"] = 2 * tokens * h_pp + (tokens * h if st.sequence_parallel else 0)
    if rt.attention == "unfused":  # megatron keeps its Q K^T buffer at the largest size used
        heads = max(inp.student.num_attention_heads, inp.teacher.num_attention_heads)
        spec_like = inp.student if inp.student.num_attention_heads == heads else inp.teacher
        act = DTYPE_BYTES[inp.student_dtype]
        sizes = [attention_score_buffer_bytes(spec_like, seq_len=w.seq_len, micro_batch=w.micro_batch,
                                              tp=lay.tp, act_bytes=act)]
        if w.rollout_engine == "megatron":
            length = w.prompt_len if lay.pp == 1 else w.seq_len
            sizes.append(attention_score_buffer_bytes(spec_like, seq_len=length, micro_batch=w.rollout_micro_batch,
                                                      tp=lay.tp, act_bytes=act))
        out["attention score buffer (unfused)"] = max(sizes)
    if w.rollout_engine == "vllm" and st.vllm_sleep_level == 0 and inp.device is not None:
        out["vLLM reservation (awake)"] = int(w.vllm_gpu_memory_utilization * inp.device.memory_bytes)
    return {k: int(v) for k, v in out.items() if v}


def _layer_ws(inp: PlanInputs, spec: ModelSpec, dtype: str, *, seq_len: int, micro_batch: int,
              tp: int = 0) -> int:
    """Working set of one layer's forward (no grad) or backward: taken as one layer's saved bytes."""
    return layer_bytes(spec, seq_len=seq_len, micro_batch=micro_batch, tp=tp or inp.layout.tp,
                       sp=inp.settings.sequence_parallel, act_bytes=DTYPE_BYTES[dtype],
                       attention=inp.runtime.attention)


def ops_impl(inp: PlanInputs) -> str:
    """"eager" or "compiled": what ``scoring.ops_impl`` resolves to (as ops.compiled.resolve_impl,
    assuming inductor works on the device; $MEGATRON_TIP_OPS_IMPL is not read here)."""
    impl = inp.workload.ops_impl
    if impl == "auto":
        impl = "compiled" if inp.padded_vocab // inp.layout.tp >= AUTO_MIN_VOCAB else "eager"
    return impl


def _stats_kernel_bytes(inp: PlanInputs, n: int, *, eager_buffers: int = 5) -> int:
    """fp32 work memory of one chunked pass of the token-stats kernels over ``n`` rows.

    eager: ``eager_buffers`` reused [rows, v] fp32 buffers. compiled: none inside the kernel
    (fused), but inputs shorter than a row bucket are copied into zero-padded [bucket, V/TP]
    buffers; traced (PeakMemory): the kernel body's six live [rows, v] temporaries (a, b, e^a,
    e^b, a - b and one product).
    """
    v_local = inp.padded_vocab // inp.layout.tp
    v_valid = min(v_local, inp.workload.shared_vocab)
    rows = inp.workload.stats_chunk_size or max(1, OPS_CHUNK_BYTES // (v_local * 4))
    if n <= 0:
        return 0
    if ops_impl(inp) == "eager":
        return eager_buffers * min(rows, n) * v_valid * 4
    r = row_bucket(n, rows)
    pad = r * v_local * (DTYPE_BYTES[inp.student_dtype] + DTYPE_BYTES[inp.teacher_dtype]) if n < r else 0
    return pad + (6 * r * v_valid * 4 if inp.runtime.traced_kernels else 0)


def fused_loss_bytes(inp: PlanInputs, n: int) -> dict[str, int]:
    """Transient bytes of ``vocab_parallel_linear_reverse_kl`` on ``n`` kept positions (last stage).

    Inside the forward (which also computes the gradient): three [rows, v] chunk buffers (z_S,
    z_T, dKL/dz_S), the chunk kernels' work memory, [n, H_S] hidden gradient, the weight-shaped
    fp32 gradient accumulator (cast to the weight's dtype at the end), the teacher's hidden
    rows [n, H_T]; with bf16 weights also megatron's fp32 copy of the picked hidden rows plus
    their cast back (Float16Module) and one [v, H] product per chunk (fp32 accumulation).
    """
    w, s, lay = inp.workload, inp.student, inp.layout
    a_s, a_t = DTYPE_BYTES[inp.student_dtype], DTYPE_BYTES[inp.teacher_dtype]
    v_local = inp.padded_vocab // lay.tp
    v_valid = min(v_local, w.shared_vocab)
    h = s.hidden_size
    rows = w.fused_chunk_size or max(1, FUSED_CHUNK_BYTES // (4 * v_local))
    rows = row_bucket(max(1, min(n, rows)), rows)
    impl = ops_impl(inp)
    if impl == "eager":  # on the chunk's real rows (the buffers have the bucket's)
        work = 5 * min(rows, n, max(1, OPS_CHUNK_BYTES // (v_local * 4))) * v_valid * 4  # as the op: from V/TP
    else:
        work = 6 * rows * v_valid * 4 if inp.runtime.traced_kernels else 0
    acc = v_local * h * 4
    low = a_s != 4
    loop = rows * v_valid * (2 * a_s + a_t) + work + (v_valid * h * a_s if low else 0)  # z_S, dKL/dz_S; z_T
    return {"teacher hidden rows [n, H_T]": n * inp.teacher.hidden_size * a_t,
            "hidden rows fp32 copy + cast (Float16Module)": n * h * (4 + a_s) if low else 0,
            "hidden-state gradient [n, H]": n * h * a_s + 24 * n,
            "output-weight gradient (fp32 accumulator)": acc,
            "logits chunks + kernel work (fused)": max(loop, v_local * h * a_s if low else 0)}


def _rollout(inp: PlanInputs, stage: int) -> dict[str, int]:
    w, lay, s = inp.workload, inp.layout, inp.student
    act = DTYPE_BYTES[inp.student_dtype]
    if w.rollout_engine == "vllm":
        if inp.settings.vllm_sleep_level == 0 or inp.device is None:
            return {}
        return {"vLLM reservation (awake)": int(w.vllm_gpu_memory_utilization * inp.device.memory_bytes)}
    if w.rollout_engine != "megatron":
        return {}
    b = w.rollout_micro_batch
    layers = s.num_layers // lay.pp
    out = {}
    if lay.pp == 1:  # static KV cache for the whole batch, allocated at the first forward
        out["KV cache (megatron engine)"] = 2 * layers * w.seq_len * b * (s.num_query_groups // lay.tp) \
            * s.head_dim * act
        out["prefill working set"] = _layer_ws(inp, s, inp.student_dtype, seq_len=w.prompt_len, micro_batch=b)
    else:  # the PP path recomputes the whole prefix each step (no cache)
        out["forward working set (no KV cache)"] = _layer_ws(inp, s, inp.student_dtype, seq_len=w.seq_len,
                                                             micro_batch=b)
    if stage == lay.pp - 1:
        out["last-position logits"] = b * inp.padded_vocab * (act + 4)
    return out


def _scoring(inp: PlanInputs, stage: int) -> dict[str, int]:
    w, lay = inp.workload, inp.layout
    a_s, a_t = DTYPE_BYTES[inp.student_dtype], DTYPE_BYTES[inp.teacher_dtype]
    hs, ht = inp.student.hidden_size, inp.teacher.hidden_size
    mb_tokens = w.micro_batch * w.seq_len
    own = lay.teacher_own
    t_fwd = _layer_ws(inp, inp.teacher, inp.teacher_dtype, seq_len=w.seq_len, micro_batch=w.micro_batch,
                      tp=lay.t_tp)
    s_fwd = _layer_ws(inp, inp.student, inp.student_dtype, seq_len=w.seq_len, micro_batch=w.micro_batch)
    fwd = max(s_fwd, t_fwd)
    # teacher offload: its weights come back for the whole scoring pass
    loaded = {"teacher weights (loaded from host)": teacher_weight_bytes(inp, stage)} \
        if inp.settings.teacher_offload else {}
    moments = []
    if own:  # its own layout: the teacher's last stage holds its DP share's hidden states, then
        # sends each student DP rank its rows (assumed: all scored, then redistributed; a copy each)
        t_hidden = hidden_bytes(inp, teacher_microbatches(inp) * w.micro_batch)
        mb = hidden_bytes(inp, w.micro_batch)
        kept = hidden_bytes(inp, w.num_microbatches * w.micro_batch) if stage == lay.pp - 1 else 0
        moments += [{"teacher hidden, own layout (before the redistribution)": t_hidden - mb,
                     "teacher forward working set": t_fwd},
                    {"teacher hidden, own layout (before the redistribution)": t_hidden,
                     "teacher hidden (kept to the gradient pass)": kept}]
        fwd = s_fwd
    if stage != lay.pp - 1:
        moments.append({"forward working set": fwd})
        return {**loaded, **max(moments, key=lambda m: sum(m.values()))}
    rows = w.num_microbatches * mb_tokens
    c = min(w.score_chunk_tokens, mb_tokens)
    v_local = inp.padded_vocab // lay.tp
    hidden = {"teacher hidden (kept to the gradient pass)": rows * ht * a_t,
              "student hidden": rows * hs * a_s}
    stats = {
        **hidden,
        "hidden [b*S, H] copies (1 micro-batch)": mb_tokens * (hs * a_s + ht * a_t),
        "logits chunk (student + teacher)": c * v_local * (a_s + a_t),
        "token-stats work buffers": _stats_kernel_bytes(inp, c) + 40 * c * 4,
        "per-token stats (5 x fp32)": 2 * 5 * rows * 4,
    }
    forward = {"teacher hidden (kept to the gradient pass)": hidden["teacher hidden (kept to the gradient pass)"],
               "student hidden": hidden["student hidden"] - mb_tokens * hs * a_s, "forward working set": fwd}
    moments += [stats, forward]
    return {k: v for k, v in {**loaded, **max(moments, key=lambda m: sum(m.values()))}.items() if v}


def _gradient(inp: PlanInputs, stage: int) -> dict[str, int]:
    w, lay, st, s = inp.workload, inp.layout, inp.settings, inp.student
    a_s, a_t = DTYPE_BYTES[inp.student_dtype], DTYPE_BYTES[inp.teacher_dtype]
    first, last = stage == 0, stage == lay.pp - 1
    mb_tokens = w.micro_batch * w.seq_len
    n = w.kept_per_microbatch()
    in_flight = min(lay.pp - stage, w.num_microbatches)  # 1F1B: stage p holds pp - p micro-batches
    acts_mb = stage_activation_bytes(
        s, layers=s.num_layers // lay.pp, seq_len=w.seq_len, micro_batch=w.micro_batch, tp=lay.tp,
        sp=st.sequence_parallel, act_bytes=a_s, attention=inp.runtime.attention,
        recompute=st.recompute_granularity, method=st.recompute_method, num_layers=st.recompute_num_layers)
    if first:
        acts_mb += mb_tokens * (8 + (1 if lay.tp > 1 else 0))  # token ids (+ vocab-range mask)
    if last:
        acts_mb += mb_tokens * (3 * s.hidden_size + 1) * a_s + n * s.hidden_size * a_s  # final norm, gathered rows
    else:
        acts_mb += mb_tokens * s.hidden_size * a_s  # stage output kept by the schedule until backward
    acts = {f"student activations ({in_flight} micro-batch{'es' if in_flight > 1 else ''})": in_flight * acts_mb}
    bwd_ws = _layer_ws(inp, s, inp.student_dtype, seq_len=w.seq_len, micro_batch=w.micro_batch)
    v_local = inp.padded_vocab // lay.tp
    emb = v_local * s.hidden_size * a_s
    # Tied weights on one stage: autograd holds the output layer's weight gradient in the shared
    # parameter's input buffer until the embedding's gradient arrives, then sums out of place.
    held = emb if (s.tie_word_embeddings and lay.pp == 1) else 0
    moments = [{**acts, "backward working set (1 layer)": bwd_ws,
                "output-layer weight grad held for the tied embedding": held}]
    if last and w.fused_output_layer:
        moments.append({**acts, **fused_loss_bytes(inp, n)})
    elif last:
        logits = n * v_local * (a_s + a_t)  # student logits (graph) + teacher logits, kept positions
        loss_fwd = _stats_kernel_bytes(inp, n) + n * inp.teacher.hidden_size * a_t
        loss_bwd = n * v_local * a_s + _stats_kernel_bytes(inp, n, eager_buffers=2)  # dL/dlogits + work
        out_bwd = n * v_local * a_s + emb  # dL/dlogits + output weight grad
        moments.append({**acts, "logits at kept positions + loss": max(logits + max(loss_fwd, loss_bwd), out_bwd)})
    if first:  # dense embedding gradient at the end of backward (earlier micro-batches still live)
        moments.append({"student activations (other micro-batches)": (in_flight - 1) * acts_mb,
                        "embedding weight gradient": emb * (3 if held else 1)})
    out = max(moments, key=lambda m: sum(m.values()))
    if last:
        out = {"teacher hidden (kept to the gradient pass)": w.num_microbatches * mb_tokens
               * inp.teacher.hidden_size * a_t, **out}
    return {k: int(v) for k, v in out.items() if v}


def _optimizer(inp: PlanInputs, stage: int) -> dict[str, int]:
    w, lay = inp.workload, inp.layout
    out = {}
    if stage == lay.pp - 1:
        out["teacher hidden (kept to the gradient pass)"] = w.num_microbatches * w.micro_batch * w.seq_len \
            * inp.teacher.hidden_size * DTYPE_BYTES[inp.teacher_dtype]
    if not inp.runtime.fused_adam:
        kw = dict(tp=lay.tp, pp=lay.pp, pp_rank=stage, padded_vocab=inp.padded_vocab)
        if inp.runtime.kind == "cpu":  # torch AdamW, single-tensor: sqrt(v) and sqrt(v)/c live together
            out["optimizer temporaries"] = 2 * largest_param(inp.student, **kw) * 4
        else:  # torch AdamW, foreach: one fp32 temporary per parameter at once
            shard = lay.dp if inp.settings.distributed_optimizer else 1
            out["optimizer temporaries"] = 2 * params_per_rank(inp.student, **kw) * 4 // shard
    return out


def stage_memory(inp: PlanInputs, stage: int) -> StageMemory:
    """Memory of pipeline stage ``stage`` (any TP / DP rank of it: they are alike)."""
    phases = {"scoring": _scoring(inp, stage), "gradient": _gradient(inp, stage),
              "optimizer": _optimizer(inp, stage)}
    if inp.workload.rollout_engine in ("megatron", "vllm"):
        phases = {"rollout": _rollout(inp, stage), **phases}
    return StageMemory(stage=stage, persistent=_persistent(inp, stage), phases=phases)


def plan_memory(inp: PlanInputs) -> list[StageMemory]:
    """One StageMemory per pipeline stage."""
    return [stage_memory(inp, p) for p in range(inp.layout.pp)]


def vllm_kv_capacity_tokens(inp: PlanInputs) -> int:
    """Tokens of KV cache one vLLM engine (TP_R ranks) can hold inside its per-GPU reservation:
    after its weight shard, ~2 GiB of profiled activations and, with CUDA graphs, their pool."""
    res = inp.workload.vllm_gpu_memory_utilization * (inp.device.memory_bytes if inp.device else 0)
    graphs = 0 if inp.settings.vllm_enforce_eager else VLLM_GRAPH_POOL_BYTES
    per_token = kv_bytes_per_token(inp, tp=inp.layout.r_tp)
    return max(0, math.floor((res - engine_weight_bytes(inp) - 2 * GiB - graphs) / per_token))
