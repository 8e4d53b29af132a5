"""Everything a run needs before its first step: tokenizer, teacher, student (DDP), optimizer,
LR schedule, rollout engine, prompts; plus checkpoint save/resume and step metrics helpers."""
from __future__ import annotations

import json
import os
import resource
import shutil
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from megatron_tip.config import RunConfig
from megatron_tip.data import PromptDataset
from megatron_tip.distributed import ParallelContext
from megatron_tip.models.builder import VOCAB_DIVISIBLE_BY, build_gpt_model
from megatron_tip.models.sharding import layer_offset
from megatron_tip.models.spec import ModelSpec

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def read_spec(path: str) -> ModelSpec:
    """ModelSpec of an HF dir (config.json) or a megatron checkpoint dir (model_spec.json)."""
    p = Path(path)
    if (p / "config.json").is_file():
        from transformers import AutoConfig

        from megatron_tip.convert.families import spec_from_hf_config

        return spec_from_hf_config(AutoConfig.from_pretrained(p))
    if (p / "model_spec.json").is_file():
        return ModelSpec.load(p / "model_spec.json")
    raise FileNotFoundError(f"{path!r} is neither an HF checkpoint (config.json) nor a megatron "
                            f"checkpoint (model_spec.json)")


def tokenizer_dir(path: str) -> str:
    """Where a model dir keeps its tokenizer files (HF dir itself, or a checkpoint's hf/)."""
    p = Path(path)
    return str(p / "hf") if (p / "model_spec.json").is_file() and (p / "hf").is_dir() else str(p)


def load_weights(model, path: str, *, spec: ModelSpec, ctx: ParallelContext) -> None:
    """Fill this rank's model stage from an HF dir or a megatron checkpoint dir."""
    if (Path(path) / "config.json").is_file():
        from megatron_tip.convert.hf_io import load_hf_weights

        load_hf_weights(model, path, spec=spec, tp=ctx.tp, tp_rank=ctx.tp_rank,
                        layer_offset=layer_offset(spec.num_layers, pp=ctx.pp, pp_rank=ctx.pp_rank))
    else:
        from megatron_tip.convert.checkpoint import load_megatron_checkpoint

        load_megatron_checkpoint(model, path, vocab_size=spec.vocab_size)


def shared_vocab(student: ModelSpec, teacher: ModelSpec, tokenizer, override: Optional[int]) -> int:
    """The true vocabulary both models are compared on (DESIGN §3: align on it, pad the rest).

    HF configs often pad the embedding (Qwen2.5: 151,936 vs 152,064); what must agree is the
    tokenizer's range. A model smaller than the tokenizer is a real mismatch.
    """
    v = override or len(tokenizer)
    for name, spec in (("student", student), ("teacher", teacher)):
        if spec.vocab_size < v:
            raise ValueError(f"{name} vocab_size={spec.vocab_size} is smaller than the shared "
                             f"vocabulary {v} (tokenizer length or train.vocab_size): the teacher's "
                             f"vocabulary differs from the student's beyond padding")
    return v


class TrainingSetup:
    """Built once per run; the Trainer reads its fields."""

    def __init__(self, cfg: RunConfig, ctx: ParallelContext) -> None:
        from megatron.core.distributed import (DistributedDataParallel, DistributedDataParallelConfig,
                                               finalize_model_grads)
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
        from transformers import AutoTokenizer

        from megatron_tip.eval.prompts import build_prompt, resolve_format

        self.cfg, self.ctx = cfg, ctx
        if cfg.train.prompts_per_step % ctx.dp:
            raise ValueError(f"train.prompts_per_step={cfg.train.prompts_per_step} is not divisible by "
                             f"the data-parallel size {ctx.dp}")
        for name, mc in (("student", cfg.student), ("teacher", cfg.teacher)):
            if not mc.path:
                raise ValueError(f"{name}.path is not set")
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir(cfg.student.path))
        self.student_spec, self.teacher_spec = read_spec(cfg.student.path), read_spec(cfg.teacher.path)
        t_tok = AutoTokenizer.from_pretrained(tokenizer_dir(cfg.teacher.path))
        if t_tok.get_vocab() != self.tokenizer.get_vocab():
            raise ValueError("teacher and student tokenizers differ: distillation needs one vocabulary")
        self.vocab_size = shared_vocab(self.student_spec, self.teacher_spec, self.tokenizer, cfg.train.vocab_size)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.stop_ids = tuple(i for i in {self.tokenizer.eos_token_id} if i is not None)

        # Both models shard the same padded vocab so their logits shards line up column by column.
        multiple = VOCAB_DIVISIBLE_BY * ctx.tp
        biggest = max(self.student_spec.vocab_size, self.teacher_spec.vocab_size)
        padded = -(-biggest // multiple) * multiple
        self.teacher = self._build(self.teacher_spec, cfg.teacher, padded, train=False)
        student = self._build(self.student_spec, cfg.student, padded, train=True)
        student.config.finalize_model_grads_func = finalize_model_grads
        self.student = DistributedDataParallel(student.config, DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=False),
            module=student)
        o = cfg.optim
        self.optimizer = get_megatron_optimizer(OptimizerConfig(
            optimizer="adam", lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay,
            adam_beta1=o.adam_beta1, adam_beta2=o.adam_beta2, clip_grad=o.clip_grad,
            bf16=cfg.student.dtype == "bfloat16", params_dtype=_DTYPES[cfg.student.dtype]), [self.student])
        self.scheduler = OptimizerParamScheduler(
            self.optimizer, init_lr=0.0 if o.warmup_steps else o.lr, max_lr=o.lr, min_lr=o.min_lr,
            lr_warmup_steps=o.warmup_steps, lr_decay_steps=max(cfg.train.steps, 1), lr_decay_style="cosine",
            start_wd=o.weight_decay, end_wd=o.weight_decay, wd_incr_steps=max(cfg.train.steps, 1),
            wd_incr_style="constant")

        fmt = resolve_format(self.tokenizer, fmt=cfg.data.prompt_format,
                             model_dir=tokenizer_dir(cfg.student.path), enable_thinking=cfg.data.enable_thinking)
        encode = lambda text: self.tokenizer(build_prompt(text, tokenizer=self.tokenizer, fmt=fmt),  # noqa: E731
                                             add_special_tokens=fmt.add_special_tokens)["input_ids"]
        self._encode = encode
        self.dataset = PromptDataset(cfg.data.prompts, encode=encode, max_prompt_len=cfg.data.max_prompt_len,
                                     seed=cfg.train.seed)
        self.engine = self._engine()

    def eval_dataset(self) -> Optional[PromptDataset]:
        """Held-out prompts (train.eval_prompts), formatted like the training prompts; or None."""
        if not self.cfg.train.eval_prompts:
            return None
        return PromptDataset(self.cfg.train.eval_prompts, encode=self._encode,
                             max_prompt_len=self.cfg.data.max_prompt_len, seed=self.cfg.train.seed)

    def _build(self, spec: ModelSpec, mc, padded: int, *, train: bool):
        ctx = self.ctx
        model = build_gpt_model(spec, tp=ctx.tp, pp=ctx.pp, pp_rank=ctx.pp_rank,
                                params_dtype=_DTYPES[mc.dtype], padded_vocab_size=padded, per_token_loss=train)
        load_weights(model, mc.path, spec=spec, ctx=ctx)
        if not train:
            model.eval()
            for p in model.parameters():
                p.requires_grad_(False)
        return model

    def _engine(self):
        r = self.cfg.rollout
        if r.engine == "megatron":
            from megatron_tip.rollout.megatron_engine import MegatronEngine

            return MegatronEngine(self.student, ctx=self.ctx, vocab_size=self.vocab_size,
                                  pad_id=self.pad_id, micro_batch_size=max(self.cfg.train.micro_batch_size, 8))
        from megatron_tip.rollout.colocated import TPColocatedEngine
        from megatron_tip.rollout.vllm_engine import VLLMEngine

        if not (Path(self.cfg.student.path) / "config.json").is_file():
            raise ValueError("rollout.engine=vllm starts vLLM from the student's HF dir; student.path "
                             "is a megatron checkpoint (convert it with tools/convert_checkpoint.py)")
        dtype = self.cfg.student.dtype
        max_len = self.cfg.data.max_prompt_len + r.max_new_tokens
        return TPColocatedEngine(lambda **parallel: VLLMEngine(
            self.cfg.student.path, dtype=dtype, gpu_memory_utilization=r.vllm_gpu_memory_utilization,
            max_model_len=max_len, seed=self.cfg.train.seed, **parallel), ctx=self.ctx)

    def sync_engine_weights(self) -> None:
        """Push the student's weights into the rollout engine (no-op for the megatron engine)."""
        if self.cfg.rollout.engine == "megatron":
            return
        from megatron_tip.convert.mapping import canonical_to_hf
        from megatron_tip.models.sharding import gather_canonical_state_dict

        canonical = gather_canonical_state_dict(self.student.module, tp_group=self.ctx.tp_group,
                                                vocab_size=self.student_spec.vocab_size)
        self.engine.sync_weights(canonical_to_hf(canonical, self.student_spec))

    def count_correct(self, rollouts, prompts) -> int:
        """How many rollouts end in a \\boxed{} answer equal to their prompt's (math-verify)."""
        from megatron_tip.eval.grading import grade

        return sum(grade(self.tokenizer.decode(r.response_ids, skip_special_tokens=True),
                         prompts[r.prompt_index].answer) for r in rollouts)

    def rollout_metrics(self, prompts, rollouts, packed) -> dict[str, float]:
        """Mean response length and grader accuracy over the global batch."""
        n = self.cfg.rollout.samples_per_prompt
        correct = self.count_correct(rollouts, prompts)
        t = torch.tensor([float(correct), float(len(rollouts)), float(packed.valid.sum())], dtype=torch.float64)
        dist.all_reduce(t, group=self.ctx.dp_group)
        assert len(rollouts) == len(prompts) * n
        return {"rollout_accuracy": float(t[0] / t[1]), "response_len": float(t[2] / t[1])}

    def peak_memory_gb(self) -> float:
        if torch.cuda.is_available():
            return torch.cuda.max_memory_allocated() / 2**30
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB

    # ---- checkpoints ---------------------------------------------------------------------------
    def save(self, step: int, out_dir: str) -> str:
        """Collective: student weights (dist_checkpointing) + optimizer/scheduler + step, atomically."""
        from megatron_tip.convert.checkpoint import save_megatron_checkpoint

        final = Path(out_dir) / "checkpoints" / f"step_{step:06d}"
        save_megatron_checkpoint(self.student.module, final, spec=self.student_spec, tp=self.ctx.tp,
                                 pp=self.ctx.pp, hf_dir=tokenizer_dir(self.cfg.student.path),
                                 overwrite=True, extra_metadata={"step": step})
        # Optimizer state per rank (same layout on resume), written beside, then the marker.
        tmp = final / f"optim_rank{self.ctx.rank:05d}.pt.tmp"
        torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}, tmp)
        os.replace(tmp, final / f"optim_rank{self.ctx.rank:05d}.pt")
        dist.barrier()
        if self.ctx.rank == 0:
            (final / "trainer_state.json").write_text(json.dumps(
                {"step": step, "world_size": self.ctx.world_size, "tp": self.ctx.tp, "pp": self.ctx.pp}))
        dist.barrier()
        return str(final)

    def resume(self, out_dir: str) -> int:
        """Load the newest complete checkpoint under out_dir; returns the next step to run."""
        from megatron_tip.convert.checkpoint import load_megatron_checkpoint

        root = Path(out_dir) / "checkpoints"
        done = sorted(p for p in root.glob("step_*") if (p / "trainer_state.json").is_file()) if root.is_dir() else []
        if not done:
            raise FileNotFoundError(f"train.resume=true but no complete checkpoint under {root}")
        ckpt = done[-1]
        state = json.loads((ckpt / "trainer_state.json").read_text())
        if (state["world_size"], state["tp"], state["pp"]) != (self.ctx.world_size, self.ctx.tp, self.ctx.pp):
            raise ValueError(f"checkpoint {ckpt} was written at world={state['world_size']} tp={state['tp']} "
                             f"pp={state['pp']}; resume needs the same layout (optimizer state is per rank)")
        load_megatron_checkpoint(self.student.module, ckpt, vocab_size=self.student_spec.vocab_size)
        opt = torch.load(ckpt / f"optim_rank{self.ctx.rank:05d}.pt", weights_only=False)
        self.optimizer.load_state_dict(opt["optimizer"])
        self.scheduler.load_state_dict(opt["scheduler"])
        return int(state["step"]) + 1


def remove_incomplete_checkpoints(out_dir: str) -> None:
    """Drop step dirs without trainer_state.json (a run killed mid-save)."""
    root = Path(out_dir) / "checkpoints"
    for p in root.glob("step_*") if root.is_dir() else []:
        if not (p / "trainer_state.json").is_file():
            shutil.rmtree(p, ignore_errors=True)
