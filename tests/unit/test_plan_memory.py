"""Pieces of the memory model checked against hand counts (the step as a whole: test_plan_calibration)."""
import pytest

from megatron_tip.plan.activations import stage_activation_bytes
from megatron_tip.plan.devices import DEVICES
from megatron_tip.plan.inputs import Layout, PlanInputs, Settings, Workload
from megatron_tip.plan.memory import params_per_rank, plan_memory, total_params
from megatron_tip.plan.shapes import SHAPES

GiB = 2**30
QWEN4B, QWEN8B = SHAPES["qwen3-4b"].spec(), SHAPES["qwen3-8b"].spec()


def _inputs(keep=0.5, engine="megatron", **settings):
    w = Workload(rollouts=32, seq_len=10240, prompt_len=2048, response_len=8192, micro_batch=1, keep_ratio=keep,
                 score_chunk_tokens=512, stats_chunk_size=256, shared_vocab=151936, rollout_engine=engine,
                 rollout_micro_batch=8, vllm_gpu_memory_utilization=0.5, fused_chunk_size=256)
    return PlanInputs(student=QWEN4B, teacher=QWEN8B, student_dtype="bfloat16", teacher_dtype="bfloat16",
                      layout=Layout(tp=2, pp=1, dp=4), settings=Settings(**settings), workload=w,
                      device=DEVICES["h100-80gb"])


def test_params_per_rank_add_up_to_the_model_plus_padding():
    spec = SHAPES["qwen2.5-14b"].spec()  # untied, vocab 152,064 = 1188 x 128
    for tp, pp in ((1, 1), (2, 1), (8, 2), (4, 4)):
        padded = -(-spec.vocab_size // (128 * tp)) * 128 * tp
        got = sum(params_per_rank(spec, tp=tp, pp=pp, pp_rank=r, padded_vocab=padded) for r in range(pp)) * tp
        norms = (2 * spec.num_layers + 1) * spec.hidden_size + 2 * spec.num_layers * spec.head_dim * spec.qk_layernorm
        # TP shards everything but the norms, which every TP rank holds
        assert got - (tp - 1) * norms == total_params(spec) + 2 * (padded - spec.vocab_size) * spec.hidden_size


def test_tied_embeddings_get_a_copy_on_the_last_stage_only_with_pp():
    spec = QWEN4B
    emb = 151936 * spec.hidden_size
    one = params_per_rank(spec, tp=1, pp=1, pp_rank=0, padded_vocab=151936)
    two = [params_per_rank(spec, tp=1, pp=2, pp_rank=r, padded_vocab=151936) for r in (0, 1)]
    assert sum(two) == one + emb


def test_optimizer_state_bytes_and_distributed_optimizer():
    n = params_per_rank(QWEN4B, tp=2, pp=1, pp_rank=0, padded_vocab=_inputs().padded_vocab)
    assert _inputs().padded_vocab == 152064  # 151,936 rounded up to a multiple of 128 x TP
    plain = plan_memory(_inputs())[0].persistent
    assert plain["student weights"] == 2 * n and plain["student grads (fp32 buffer)"] == 4 * n
    assert plain["student fp32 main params"] == 4 * n and plain["student Adam state"] == 8 * n
    dist = plan_memory(_inputs(distributed_optimizer=True))[0].persistent
    assert dist["student Adam state"] == 8 * n // 4 and dist["student fp32 main params"] == 4 * n // 4
    assert dist["student grads (fp32 buffer)"] == 4 * n  # megatron keeps the full grad buffer


def test_megatron_engine_kv_cache():
    got = plan_memory(_inputs())[0].phases["rollout"]["KV cache (megatron engine)"]
    # K and V x 36 layers x 10240 positions x 8 rows x (8 KV heads / TP 2) x 128 x bf16
    assert got == 2 * 36 * 10240 * 8 * 4 * 128 * 2


def test_vllm_reservation_is_freed_for_training_only_when_asleep():
    awake = plan_memory(_inputs(engine="vllm"))[0]
    asleep = plan_memory(_inputs(engine="vllm", vllm_sleep_level=1))[0]
    res = int(0.5 * DEVICES["h100-80gb"].memory_bytes)
    assert awake.persistent["vLLM reservation (awake)"] == res
    assert "vLLM reservation (awake)" not in asleep.persistent
    assert asleep.phases["rollout"]["vLLM reservation (awake)"] == res
    assert awake.total("gradient") - asleep.total("gradient") == res


def test_keep_ratio_shrinks_only_the_gradient_pass():
    totals = {rho: plan_memory(_inputs(keep=rho))[0] for rho in (1.0, 0.5, 0.2, 0.1)}
    grad = [totals[r].total("gradient") for r in (1.0, 0.5, 0.2, 0.1)]
    assert grad == sorted(grad, reverse=True) and grad[0] > grad[-1]
    assert len({totals[r].total("scoring") for r in totals}) == 1
    assert len({totals[r].total("rollout") for r in totals}) == 1


@pytest.mark.parametrize("attention", ["flash", "unfused"])
def test_recomputation_and_sequence_parallel_order(attention):
    def acts(recompute="none", sp=False, n=1):
        return stage_activation_bytes(QWEN4B, layers=36, seq_len=4096, micro_batch=1, tp=2, sp=sp, act_bytes=2,
                                      attention=attention, recompute=recompute, num_layers=n)

    assert acts("full") < acts("selective") <= acts("none")
    assert acts("full", n=1) < acts("full", n=6)  # one recomputed group at a time, but fewer saved inputs
    # full/uniform/1: each layer keeps its input [S, b, H]; one layer is live again during backward
    one_layer = acts("none") // 36
    assert acts("full") == 36 * 4096 * 2560 * 2 + one_layer
    if attention == "flash":
        assert acts(sp=True) < acts()
        assert acts("none") - acts("selective") == 36 * 4096 * 2 * 16 * 2  # the fp32 log-sum-exp


def test_fused_output_layer_is_flat_in_kept_tokens_and_unfused_grows():
    """Fused: chunk buffers + [n, H] + one fp32 weight-shaped accumulator; unfused: [n, V/TP] logits."""
    def loss_bytes(keep, fused):
        inp = _inputs(keep=keep).with_(fused_output_layer=fused)
        g = plan_memory(inp)[0].phases["gradient"]
        return g, sum(g.values())

    fused = {k: loss_bytes(k, True) for k in (1.0, 0.2)}
    g = fused[1.0][0]
    v_local, h = 152064 // 2, QWEN4B.hidden_size
    assert g["output-weight gradient (fp32 accumulator)"] == v_local * h * 4
    # fused_chunk_size=256 rows: z_S, z_T, dKL/dz_S chunks (bf16) + one [v, H] bf16 product (TP rank 0:
    # every column of its shard is a real token)
    assert g["logits chunks + kernel work (fused)"] == 3 * 256 * v_local * 2 + v_local * h * 2
    n = 8192  # kept positions of one micro-batch at rho = 1
    assert g["hidden-state gradient [n, H]"] == n * h * 2 + 24 * n
    unfused = {k: loss_bytes(k, False)[1] for k in (1.0, 0.2)}
    # rho 1 -> 0.2 drops 0.8 x 8192 rows of [V/TP] logits (student + teacher, bf16) and more
    assert unfused[1.0] - unfused[0.2] >= 0.8 * n * v_local * 4
    assert fused[1.0][1] - fused[0.2][1] < unfused[1.0] - unfused[0.2]
    assert fused[1.0][1] < unfused[1.0]


def test_fused_chunk_follows_its_own_knob_and_the_ops_default():
    """scoring.fused_chunk_size sizes the fused op's logits chunks; stats_chunk_size does not (#24)."""
    from megatron_tip.ops.fused_linear_rkl import FUSED_CHUNK_BYTES
    from megatron_tip.plan.memory import fused_loss_bytes

    v_local, h = 152064 // 2, QWEN4B.hidden_size
    key = "logits chunks + kernel work (fused)"

    def chunks(**w):
        return fused_loss_bytes(_inputs().with_(**w), 8192)[key] - v_local * h * 2  # minus the [v, H] product

    assert chunks(fused_chunk_size=64) == 3 * 64 * v_local * 2
    assert chunks(fused_chunk_size=64, stats_chunk_size=2048) == chunks(fused_chunk_size=64)
    default_rows = FUSED_CHUNK_BYTES // (4 * v_local)  # 882 rows of 76,032 fp32 columns: 256 MiB
    assert chunks(fused_chunk_size=None) == 3 * default_rows * v_local * 2


def test_ops_impl_auto_compiles_wide_vocab_shards_and_drops_the_eager_buffers():
    from megatron_tip.ops.compiled import AUTO_MIN_VOCAB
    from megatron_tip.plan.inputs import TRACED_CPU_RUNTIME
    from megatron_tip.plan.memory import AUTO_MIN_VOCAB as planner_min, _stats_kernel_bytes, ops_impl

    assert planner_min == AUTO_MIN_VOCAB
    assert ops_impl(_inputs()) == "compiled" and ops_impl(_inputs().with_(ops_impl="eager")) == "eager"
    narrow = _inputs().with_(layout=Layout(tp=64, pp=1, dp=1))  # 2376 columns per shard: eager
    assert ops_impl(narrow) == "eager"
    v_local = 152064 // 2
    kernel = {impl: _stats_kernel_bytes(_inputs().with_(ops_impl=impl), 512) for impl in ("eager", "compiled")}
    assert kernel == {"eager": 5 * 256 * v_local * 4, "compiled": 0}  # five fp32 [rows, v] buffers vs none
    traced = _stats_kernel_bytes(_inputs().with_(runtime=TRACED_CPU_RUNTIME), 512)
    assert traced == 6 * 256 * v_local * 4  # the kernel body run as plain ops (under PeakMemory)


def test_planner_takes_the_ops_constants_and_row_bucket_from_ops():
    """One source: the planner's kernel sizes are the ops' own, not copies that can drift."""
    from megatron_tip.ops import compiled, fused_linear_rkl, token_stats
    from megatron_tip.plan import memory

    assert memory.row_bucket is compiled.row_bucket
    assert (memory.OPS_CHUNK_BYTES, memory.FUSED_CHUNK_BYTES) == (token_stats.STATS_CHUNK_BYTES,
                                                                  fused_linear_rkl.FUSED_CHUNK_BYTES)
    assert not hasattr(memory, "_row_bucket")
