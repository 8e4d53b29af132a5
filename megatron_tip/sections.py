"""The config sections of the top-level components: ``train`` (trainer), ``scoring`` (scoring),
``optim`` (optim), ``parallel`` (distributed), ``log`` (metrics_log).

Plain dataclasses that import no torch and no runtime module, so ``megatron_tip.config`` (and the
planner) read a config without loading torch or megatron. The sections of the sub-packages live in
each package's ``config.py`` (``rollout``, ``models``, ``selection``, ``data``, ``eval``, ``checkpoint``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megatron_tip.ops.impls import IMPLS
from megatron_tip.validation import at_least, in_range, int_range, one_of

PACKINGS = ("bins", "thd")  # train.packing: the token-budget layout (docs/packing.md)


@dataclass
class TrainConfig:
    """The ``train`` config section: how long and how big each step is."""

    steps: int = 10
    prompts_per_step: int = 8  # global batch of prompts (split over data-parallel ranks)
    micro_batch_size: int = 4  # sequences per forward in scoring and gradient passes (fixed-rows mode)
    # > 0: micro-batches by token budget instead (rows x longest row <= this; length-sorted,
    # each trimmed to its longest row; docs/packing.md); 0: micro_batch_size rows at the step's width
    max_tokens_per_microbatch: int = 0
    # With a budget: "bins" (length-sorted rows trimmed to their longest: any layer spec) or "thd"
    # (rollouts concatenated per row, PackedSeqParams/cu_seqlens: Transformer Engine's spec only).
    packing: str = "bins"
    seed: int = 1234
    max_skipped_fraction: float = 0.5  # fail the run once more than this share of train.steps is skipped

    def __post_init__(self) -> None:
        at_least("steps", self.steps, 1)
        at_least("prompts_per_step", self.prompts_per_step, 1)
        at_least("micro_batch_size", self.micro_batch_size, 1)
        int_range("seed", self.seed, 0, 2**32 - 1)  # numpy (vLLM) takes 32-bit seeds; torch 64-bit
        at_least("max_tokens_per_microbatch", self.max_tokens_per_microbatch, 0)
        one_of("packing", self.packing, PACKINGS)
        in_range("max_skipped_fraction", self.max_skipped_fraction, 0.0, 1.0)


@dataclass
class ScoringConfig:
    """The ``scoring`` config section: how token statistics are computed."""

    score_chunk_tokens: int = 512  # scoring pass: logits rows materialized at a time
    # Tokens per chunk inside the ops (None: from a byte budget and the V/TP shard width; docs/ops.md):
    # the stats op (scoring pass; unfused gradient pass): fp32 work buffers, default 16 MiB each;
    stats_chunk_size: Optional[int] = None
    # the fused output-layer op (fused gradient pass): [rows, V/TP] logits chunks, default 256 MiB.
    fused_chunk_size: Optional[int] = None
    vocab_size: Optional[int] = None  # shared true vocab; None: the tokenizer's length
    # Chunk kernels: auto (compiled for vocab shards >= 4096 columns, else eager; the environment
    # variable MEGATRON_TIP_OPS_IMPL overrides auto), eager, compiled (docs/ops.md).
    ops_impl: str = "auto"
    # Gradient pass: output layer fused into the reverse KL (no [n_kept, V/TP] logits held);
    # false applies both output layers and then the loss, as before (same math, more memory).
    fused_output_layer: bool = True
    # One student forward per step (PP=1, fused output layer; ignored otherwise): the scoring pass
    # keeps the student's graph and the gradient pass backpropagates from its kept positions, instead
    # of a no-grad scoring forward plus a second forward. Same numbers; memory: every micro-batch's
    # student activations live until the gradient pass (small models: the toy; docs/speed.md).
    one_student_forward: bool = False

    def __post_init__(self) -> None:
        one_of("ops_impl", self.ops_impl, IMPLS)
        at_least("score_chunk_tokens", self.score_chunk_tokens, 1)
        at_least("stats_chunk_size", self.stats_chunk_size, 1, optional=True)
        at_least("fused_chunk_size", self.fused_chunk_size, 1, optional=True)
        at_least("vocab_size", self.vocab_size, 1, optional=True)


@dataclass
class OptimConfig:
    lr: float = 1e-6
    min_lr: float = 0.0
    warmup_steps: int = 0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    clip_grad: float = 1.0  # 0: no clipping
    distributed_optimizer: bool = False  # shard fp32 main params + Adam state over data-parallel ranks (CUDA only)

    def __post_init__(self) -> None:
        at_least("lr", self.lr, 0.0)
        in_range("min_lr", self.min_lr, 0.0, self.lr)
        at_least("warmup_steps", self.warmup_steps, 0)
        at_least("weight_decay", self.weight_decay, 0.0)
        in_range("adam_beta1", self.adam_beta1, 0.0, 1.0, high_open=True)
        in_range("adam_beta2", self.adam_beta2, 0.0, 1.0, high_open=True)
        at_least("clip_grad", self.clip_grad, 0.0)


@dataclass
class ParallelConfig:
    """The ``parallel`` config section: model-parallel sizes (data parallel = world / (TP x PP))."""

    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    # megatron sequence parallelism: accepted by the config (the planner can size it) but refused
    # at build time until the kept-position output layer handles sequence-sharded hidden states.
    sequence_parallel: bool = False

    def __post_init__(self) -> None:
        at_least("tensor_parallel", self.tensor_parallel, 1)
        at_least("pipeline_parallel", self.pipeline_parallel, 1)
        if self.sequence_parallel and self.tensor_parallel < 2:
            raise ValueError("sequence_parallel=true needs tensor_parallel >= 2")


@dataclass
class LogConfig:
    """The ``log`` config section."""

    tensorboard: bool = True
    dump_token_stats: bool = False  # save the last step's per-token h / KL / mask (for plots)
    preflight: bool = True  # print the capacity plan of this run once at start-up (docs/planner.md)
