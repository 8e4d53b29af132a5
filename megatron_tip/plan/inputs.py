"""What the planner computes from: model shapes, layout, memory settings, one step's workload.

``inputs_from_config`` reads the trainer's own ``RunConfig`` and refuses what the trainer refuses
(``megatron_tip.run_checks.check_layout``, the same function and message).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional

from megatron_tip.models.spec import ModelSpec, padded_vocab
from megatron_tip.plan.devices import Device, device as lookup_device
from megatron_tip.run_checks import check_layout, shared_vocab

DTYPE_BYTES = {"float32": 4, "bfloat16": 2}

# What-if keys the planner accepts but the trainer does not read (none at present: the rollout
# batch, once one, is the trainer's own rollout.micro_batch_size).
WHAT_IF_KEYS: dict[str, type] = {}


@dataclass(frozen=True)
class Settings:
    """The memory features of a run (megatron-core options, vLLM sleep mode)."""

    recompute_granularity: str = "none"  # none | selective | full
    recompute_method: str = "uniform"  # uniform | block (full recompute only)
    recompute_num_layers: int = 1
    sequence_parallel: bool = False
    distributed_optimizer: bool = False
    vllm_sleep_level: int = 0  # 0 off; 1 offload weights + free KV cache; 2 discard both


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    dp: int
    nodes: int = 1
    gpus_per_node: int = 8

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.dp


@dataclass(frozen=True)
class Runtime:
    """How the step executes: what the memory formulas must assume about kernels."""

    kind: str = "gpu"  # gpu | cpu
    attention: str = "flash"  # flash (Transformer Engine) | unfused (megatron local spec)
    fused_adam: bool = True  # TE/apex FusedAdam (no temporaries) vs torch AdamW (per-tensor temporaries)
    reserve_bytes: int = 3 * 2**30  # CUDA context, cuBLAS workspace, NCCL communicators
    # True where torch.compile'd ops kernels run as their plain-torch bodies (under a
    # TorchDispatchMode such as PeakMemory, which compile refuses): their [rows, v] temporaries
    # then exist. Only for predicting measurements made under such a tracker.
    traced_kernels: bool = False


CPU_RUNTIME = Runtime(kind="cpu", attention="unfused", fused_adam=False, reserve_bytes=0)
# What megatron_tip.testing.memory.PeakMemory sees of a CPU step (calibration, token-budget study).
TRACED_CPU_RUNTIME = Runtime(kind="cpu", attention="unfused", fused_adam=False, reserve_bytes=0,
                             traced_kernels=True)


@dataclass(frozen=True)
class Workload:
    """One step on one data-parallel rank (worst case: every sequence at full length)."""

    rollouts: int  # sequences per data-parallel rank
    seq_len: int  # packed width S = prompt + response
    prompt_len: int  # prefill length in the rollout engine
    response_len: int  # positions per sequence that predict a response token
    micro_batch: int
    keep_ratio: float  # fraction of response positions in the gradient pass
    score_chunk_tokens: int
    stats_chunk_size: Optional[int]  # scoring.stats_chunk_size (stats op)
    shared_vocab: int  # true vocabulary both models are compared on
    rollout_engine: str = "megatron"
    rollout_micro_batch: int = 8
    vllm_gpu_memory_utilization: float = 0.4
    policy: str = "topk"  # selection policy ("quadrants": the kept share is data-dependent)
    fused_output_layer: bool = True  # scoring.fused_output_layer: output layer fused into the reverse KL
    ops_impl: str = "auto"  # scoring.ops_impl: auto | eager | compiled (the ops' chunk kernels)
    fused_chunk_size: Optional[int] = None  # scoring.fused_chunk_size (fused output-layer op)

    @property
    def num_microbatches(self) -> int:
        return math.ceil(self.rollouts / self.micro_batch)

    def kept_per_microbatch(self) -> int:
        """Gradient-pass positions of one micro-batch: floor(rho * m) per sequence (selection)."""
        rows = min(self.micro_batch, self.rollouts)  # a lone short micro-batch is padded with empty rows
        return rows * math.floor(self.keep_ratio * self.response_len + 1e-6)


@dataclass(frozen=True)
class PlanInputs:
    student: ModelSpec
    teacher: ModelSpec
    student_dtype: str
    teacher_dtype: str
    layout: Layout
    settings: Settings
    workload: Workload
    runtime: Runtime = Runtime()
    device: Optional[Device] = None  # None: no capacity check, no timing (CPU calibration)
    student_source: str = ""
    teacher_source: str = ""

    @property
    def padded_vocab(self) -> int:
        """Both models shard the same padded vocab (as the trainer builds them)."""
        return padded_vocab(max(self.student.vocab_size, self.teacher.vocab_size), tp=self.layout.tp)

    def with_(self, **changes: Any) -> "PlanInputs":
        """A copy with fields of the inputs, layout, settings or workload replaced (by name)."""
        groups = {"layout": Layout, "settings": Settings, "workload": Workload, "runtime": Runtime}
        out = self
        for key, value in changes.items():
            for group, cls in groups.items():
                if key in cls.__dataclass_fields__:
                    out = replace(out, **{group: replace(getattr(out, group), **{key: value})})
                    break
            else:
                out = replace(out, **{key: value})
        return out


def split_overrides(overrides: list[str], cfg_cls: Any = None) -> tuple[list[str], dict[str, str]]:
    """Separate the what-if ``key=value`` overrides the trainer does not read (``WHAT_IF_KEYS``)."""
    known, planner = [], {}
    for ov in overrides:
        key = ov.split("=", 1)[0].strip()
        if key in WHAT_IF_KEYS:
            planner[key] = ov.split("=", 1)[1]
        else:
            known.append(ov)
    return known, planner


def settings_from(cfg: Any) -> Settings:
    """The memory features of the run ``cfg`` (RunConfig)."""
    return Settings(recompute_granularity=cfg.student.recompute_granularity,
                    recompute_method=cfg.student.recompute_method,
                    recompute_num_layers=cfg.student.recompute_num_layers,
                    sequence_parallel=cfg.parallel.sequence_parallel,
                    distributed_optimizer=cfg.optim.distributed_optimizer,
                    vllm_sleep_level=cfg.rollout.vllm_sleep_level)


def resolve_spec(path: str, shape: Optional[str]) -> tuple[ModelSpec, str]:
    """ModelSpec from a checkpoint dir when it exists here, else from the shape table."""
    from megatron_tip.plan.shapes import shape_for

    if shape:
        s = shape_for(shape)
        return s.spec(), f"shape table: {s.name} ({s.source} config.json)"
    if not path:
        raise ValueError("model path is empty: set student.path / teacher.path or pass a shape name")
    from megatron_tip.checkpoint import is_hf_dir, is_megatron_checkpoint, read_spec

    if Path(path).is_dir() and (is_hf_dir(path) or is_megatron_checkpoint(path)):
        return read_spec(path), f"{path}"
    s = shape_for(path)
    return s.spec(), f"shape table: {s.name} ({s.source} config.json; {path} is not here)"


def _runtime(cfg: Any, dev: Optional[Device], attention: Optional[str], fused_adam: bool) -> Runtime:
    if dev is None:
        return CPU_RUNTIME
    impl = cfg.student.transformer_impl
    return Runtime(attention=attention or ("unfused" if impl == "local" else "flash"), fused_adam=fused_adam)


def default_nodes(tp: int, pp: int, gpus_per_node: int) -> int:
    """Fewest nodes whose GPUs hold at least one whole tp x pp model replica."""
    return max(1, math.ceil(tp * pp / gpus_per_node))


def inputs_from_config(cfg: Any, *, gpu: Optional[str] = "h100-80gb", nodes: Optional[int] = None,
                       world_size: Optional[int] = None, student: Optional[ModelSpec] = None,
                       teacher: Optional[ModelSpec] = None, student_shape: Optional[str] = None,
                       teacher_shape: Optional[str] = None, planner: Optional[dict[str, str]] = None,
                       runtime: Optional[Runtime] = None, attention: Optional[str] = None,
                       fused_adam: bool = True) -> PlanInputs:
    """PlanInputs for the run ``cfg`` describes, on ``nodes`` x 8 ``gpu`` (or ``world_size`` ranks).

    ``gpu="cpu"``: the run on this machine's CPU (one process per TP x PP rank unless
    ``world_size``), planned with the CPU runtime and no step time.

    ``runtime`` defaults to a GPU runtime whose attention follows ``student.transformer_impl``
    (local: megatron's unfused attention; auto / transformer_engine: flash) unless ``attention``
    names one; without a device, the CPU runtime.
    """
    cpu = gpu == "cpu"
    dev = lookup_device(gpu) if gpu and not cpu else None
    tp, pp = int(cfg.parallel.tensor_parallel), int(cfg.parallel.pipeline_parallel)
    per_node = dev.gpus_per_node if dev else 8
    if world_size is None and cpu:
        world_size = tp * pp  # a CPU run: this machine, one process per model-parallel rank (DP=1)
    if world_size is None:
        nodes = nodes or default_nodes(tp, pp, per_node)
        world_size = nodes * per_node
    s_src = t_src = "given"
    if student is None:
        student, s_src = resolve_spec(cfg.student.path, student_shape)
    if teacher is None:
        teacher, t_src = resolve_spec(cfg.teacher.path, teacher_shape)
    # What the trainer refuses before loading (world size, divisibility, heads, KV groups, sequence
    # length, recomputation, vocabulary), refused here with the trainer's own words.
    check_layout(cfg, student=student, teacher=teacher, world_size=world_size)
    dp = world_size // (tp * pp)
    layout = Layout(tp=tp, pp=pp, dp=dp, nodes=1 if cpu else nodes or math.ceil(world_size / per_node),
                    gpus_per_node=world_size if cpu else per_node)
    prompts = int(cfg.train.prompts_per_step)
    sel = cfg.selection
    keep = 1.0 if sel.policy in ("all", "quadrants") else float(sel.keep_ratio)
    r = cfg.rollout
    mbs = int(cfg.train.micro_batch_size)
    prompt_len = int(cfg.data.max_prompt_len)
    shared = shared_vocab(student.vocab_size, teacher.vocab_size, override=cfg.scoring.vocab_size)
    rollouts = prompts // dp * int(r.samples_per_prompt)
    workload = Workload(
        rollouts=rollouts, seq_len=prompt_len + int(r.max_new_tokens),
        # the trainer's micro-batch never holds more rows than a rank's rollouts
        prompt_len=prompt_len, response_len=int(r.max_new_tokens), micro_batch=min(mbs, rollouts), keep_ratio=keep,
        score_chunk_tokens=cfg.scoring.score_chunk_tokens, stats_chunk_size=cfg.scoring.stats_chunk_size,
        shared_vocab=int(shared), rollout_engine=r.engine,
        # the megatron engine's decode batch: rollout.micro_batch_size, 0 = all of the rank's rollouts
        rollout_micro_batch=min(int(r.micro_batch_size) or rollouts, rollouts),
        policy=sel.policy,
        fused_output_layer=bool(cfg.scoring.fused_output_layer), ops_impl=str(cfg.scoring.ops_impl),
        fused_chunk_size=cfg.scoring.fused_chunk_size,
        vllm_gpu_memory_utilization=float(r.vllm_gpu_memory_utilization))
    return PlanInputs(student=student, teacher=teacher, student_dtype=cfg.student.dtype,
                      teacher_dtype=cfg.teacher.dtype, layout=layout, settings=settings_from(cfg),
                      workload=workload, runtime=runtime or _runtime(cfg, dev, attention, fused_adam),
                      device=dev, student_source=s_src, teacher_source=t_src)
