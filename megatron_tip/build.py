"""Build everything a run needs before its first step, and nothing else.

``build(cfg, ctx)`` returns a :class:`Built`: tokenizer, teacher (frozen), student (megatron DDP),
optimizer and LR schedule, rollout engine, prompt sets. Checkpoints live in
``megatron_tip.checkpoint``, the step in ``megatron_tip.trainer``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

from megatron_tip.checkpoint import is_hf_dir, load_weights, tokenizer_dir
from megatron_tip.config import RunConfig
from megatron_tip.data import PromptDataset
from megatron_tip.data.prompts import build_prompt, resolve_format
from megatron_tip.distributed import ParallelContext
from megatron_tip.models.builder import build_gpt_model, resolved_impl
from megatron_tip.models.config import ModelConfig
from megatron_tip.models.spec import ModelSpec, padded_vocab
from megatron_tip.optim import build_optimizer
from megatron_tip.rollout import build_engine, check_engine, stop_token_ids
from megatron_tip.run_checks import check_inputs, check_recompute, shared_vocab
from megatron_tip.teacher import Teacher, build_teacher


@dataclass
class Built:
    """The parts of a run; the Trainer reads them."""

    tokenizer: Any
    student_spec: ModelSpec
    teacher_spec: ModelSpec
    vocab_size: int  # the true vocabulary both models are compared on
    pad_id: int
    stop_ids: tuple[int, ...]
    teacher: Teacher  # frozen, in the student's layout or its own (megatron_tip.teacher)
    student: Any  # megatron DistributedDataParallel around the student's GPTModel stage
    optimizer: Any
    scheduler: Any
    engine: Any  # rollout engine (megatron_tip.rollout)
    dataset: PromptDataset
    encode: Callable[[str], list[int]]  # problem text -> prompt token ids (format of the student)
    eval_dataset: Optional[PromptDataset] = None


def check_memory_features(cfg: RunConfig, *, student: ModelSpec, ctx: ParallelContext) -> None:
    """Refuse memory settings this build cannot run, before any weight loads (one clear line each)."""
    if cfg.parallel.sequence_parallel:
        raise ValueError("parallel.sequence_parallel=true is not supported yet: the kept-position output layer "
                         "and the megatron sampler expect full-sequence hidden states (and megatron-core's torch "
                         "norms refuse it without Transformer Engine); use student.recompute_granularity")
    if cfg.optim.distributed_optimizer and ctx.device.type != "cuda":
        raise ValueError("optim.distributed_optimizer=true needs CUDA: megatron-core's DistributedOptimizer "
                         "accepts only torch.cuda tensors")
    check_recompute(cfg.student, num_layers=student.num_layers, pp=ctx.pp)
    check_packing(cfg)


def check_packing(cfg: RunConfig) -> None:
    """train.packing=thd needs attention that stops at cu_seqlens: Transformer Engine's spec for both models
    (megatron's local DotProductAttention refuses packed_seq_params)."""
    if cfg.train.packing != "thd":
        return
    for role, mc in (("student", cfg.student), ("teacher", cfg.teacher)):
        if resolved_impl(mc.transformer_impl) != "transformer_engine":
            raise ValueError(f"train.packing=thd needs Transformer Engine's layer spec, but {role}.transformer_impl="
                             f"{mc.transformer_impl} builds megatron's local spec here (no CUDA or no transformer-engine), "
                             f"whose attention refuses packed sequences; use train.packing=bins")


def _student(spec: ModelSpec, mc: ModelConfig, padded: int, ctx: ParallelContext):
    model = build_gpt_model(spec, tp=ctx.tp, pp=ctx.pp, pp_rank=ctx.pp_rank, params_dtype=mc.torch_dtype,
                            padded_vocab_size=padded, per_token_loss=True, transformer_impl=mc.transformer_impl,
                            config_overrides=mc.megatron_overrides())
    load_weights(model, mc.path, spec=spec, tp=ctx.tp, tp_rank=ctx.tp_rank, pp=ctx.pp, pp_rank=ctx.pp_rank)
    return model


def _ddp(model, *, distributed_optimizer: bool):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads

    model.config.finalize_model_grads_func = finalize_model_grads
    return DistributedDataParallel(model.config, DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=distributed_optimizer),
        module=model)


def build(cfg: RunConfig, ctx: ParallelContext) -> Built:
    """Build this rank's parts of the run described by ``cfg`` (collective: loads sharded weights)."""
    from transformers import AutoTokenizer

    # Paths, layout, sequence length (the planner's checks too): before anything is read or loaded.
    student_spec, teacher_spec = check_inputs(cfg, world_size=ctx.world_size)
    # local_files_only: a checked local dir must never turn into a hub lookup.
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir(cfg.student.path), local_files_only=True)
    teacher_tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir(cfg.teacher.path), local_files_only=True)
    if teacher_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise ValueError("teacher and student tokenizers differ: distillation needs one vocabulary")
    check_memory_features(cfg, student=student_spec, ctx=ctx)
    vocab_size = shared_vocab(student_spec.vocab_size, teacher_spec.vocab_size, tokenizer_len=len(tokenizer),
                              override=cfg.scoring.vocab_size)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    stop_ids = stop_token_ids(tokenizer)  # the evaluator stops on the same ids
    if cfg.rollout.engine == "vllm" and not is_hf_dir(cfg.student.path):
        raise ValueError("rollout.engine=vllm starts vLLM from the student's HF dir; student.path is a "
                         "megatron checkpoint (convert it with python -m megatron_tip.convert megatron-to-hf)")
    check_engine(cfg.rollout, ctx=ctx)  # vLLM installed, layout, sleep mode: before any model loads

    # Both output layers shard the same padded vocab so their logits shards line up column by column
    # (a teacher in its own layout holds its output weight re-split to this layout).
    padded = padded_vocab(max(student_spec.vocab_size, teacher_spec.vocab_size), tp=ctx.tp)
    teacher = build_teacher(cfg, ctx, spec=teacher_spec, padded_vocab=padded)
    student = _ddp(_student(student_spec, cfg.student, padded, ctx),
                   distributed_optimizer=cfg.optim.distributed_optimizer)
    optimizer, scheduler = build_optimizer(student, cfg.optim, params_dtype=cfg.student.torch_dtype,
                                           total_steps=cfg.train.steps)

    fmt = resolve_format(tokenizer, fmt=cfg.data.prompt_format, model_dir=tokenizer_dir(cfg.student.path),
                         enable_thinking=cfg.data.enable_thinking)

    def encode(text: str) -> list[int]:
        return tokenizer(build_prompt(text, tokenizer=tokenizer, fmt=fmt),
                         add_special_tokens=fmt.add_special_tokens)["input_ids"]

    def prompts(path: str) -> PromptDataset:
        return PromptDataset(path, encode=encode, max_prompt_len=cfg.data.max_prompt_len, seed=cfg.train.seed)

    engine = build_engine(cfg.rollout, model=student, ctx=ctx, vocab_size=vocab_size, pad_id=pad_id,
                          hf_dir=cfg.student.path, dtype=cfg.student.dtype,
                          max_model_len=cfg.data.max_prompt_len + cfg.rollout.max_new_tokens,
                          seed=cfg.train.seed, micro_batch_size=cfg.rollout.micro_batch_size or None)
    return Built(tokenizer=tokenizer, student_spec=student_spec, teacher_spec=teacher_spec, vocab_size=vocab_size,
                 pad_id=pad_id, stop_ids=stop_ids, teacher=teacher, student=student, optimizer=optimizer,
                 scheduler=scheduler, engine=engine, dataset=prompts(cfg.data.prompts), encode=encode,
                 eval_dataset=prompts(cfg.eval.prompts) if cfg.eval.prompts else None)
