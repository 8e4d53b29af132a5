"""Build the run's teacher in its layout: the student's (default) or its own (``teacher.parallel``)."""
from __future__ import annotations

from typing import Any

from megatron_tip.checkpoint import load_weights
from megatron_tip.models.builder import build_gpt_model
from megatron_tip.models.forward import output_weight
from megatron_tip.models.spec import ModelSpec
from megatron_tip.teacher.base import Teacher
from megatron_tip.teacher.checks import has_own_layout, teacher_layout
from megatron_tip.teacher.offload import HostOffload
from megatron_tip.teacher.same_layout import SameLayoutTeacher


def frozen_model(spec: ModelSpec, mc: Any, *, tp: int, pp: int, tp_rank: int, pp_rank: int, padded: int,
                 pg_collection: Any = None):
    """A GPTModel stage with its weights from ``mc.path``, in eval mode, without gradients."""
    model = build_gpt_model(spec, tp=tp, pp=pp, pp_rank=pp_rank, params_dtype=mc.torch_dtype,
                            padded_vocab_size=padded, transformer_impl=mc.transformer_impl,
                            config_overrides=mc.megatron_overrides(), pg_collection=pg_collection)
    load_weights(model, mc.path, spec=spec, tp=tp, tp_rank=tp_rank, pp=pp, pp_rank=pp_rank)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def build_teacher(cfg: Any, ctx: Any, *, spec: ModelSpec, padded_vocab: int) -> Teacher:
    """Collective: this rank's part of the frozen teacher (``cfg``: RunConfig, ``ctx``: ParallelContext).

    ``padded_vocab``: the student's padded vocab rows; the teacher's output weight is held in that
    padding and the student's TP shards in either layout.
    """
    if not has_own_layout(cfg):
        model = frozen_model(spec, cfg.teacher, tp=ctx.tp, pp=ctx.pp, tp_rank=ctx.tp_rank, pp_rank=ctx.pp_rank,
                             padded=padded_vocab)
        offload = None
        if cfg.teacher.offload:  # the output weight stays: the gradient pass reads it
            keep = (output_weight(model),) if ctx.is_last_stage else ()
            offload = HostOffload(model, device=ctx.device, keep=keep)
            offload.to_host()
        return SameLayoutTeacher(model, tp=ctx.tp, pp=ctx.pp, offload=offload)
    from megatron_tip.teacher.exchange import gather_roles
    from megatron_tip.teacher.groups import role_groups
    from megatron_tip.teacher.own_layout import OwnLayoutTeacher, student_layout_weight

    tp, pp = teacher_layout(cfg)
    groups = role_groups(tp=tp, pp=pp, world_size=ctx.world_size)
    model = frozen_model(spec, cfg.teacher, tp=tp, pp=pp, tp_rank=groups.tp_rank, pp_rank=groups.pp_rank,
                         padded=spec.padded_vocab_size(tp), pg_collection=groups.pg_collection)
    roles = gather_roles(student_dp=ctx.dp_rank, student_last=ctx.is_last_stage, teacher_dp=groups.dp_rank,
                         teacher_tp=groups.tp_rank, teacher_last=groups.is_last_stage, device=ctx.device)
    weight = student_layout_weight(model, groups, vocab_size=spec.vocab_size, hidden_size=spec.hidden_size,
                                   padded_vocab=padded_vocab, student_tp=ctx.tp, student_tp_rank=ctx.tp_rank,
                                   student_last=ctx.is_last_stage, dtype=cfg.teacher.torch_dtype, device=ctx.device)
    offload = None
    if cfg.teacher.offload:  # its output weight for the loss is a separate tensor (``weight``)
        offload = HostOffload(model, device=ctx.device)
        offload.to_host()
    return OwnLayoutTeacher(model, groups, roles, weight=weight, student_dp_rank=ctx.dp_rank,
                            student_last=ctx.is_last_stage, hidden_size=spec.hidden_size,
                            micro_batch_size=cfg.train.micro_batch_size,
                            max_tokens=cfg.train.max_tokens_per_microbatch, device=ctx.device, offload=offload)
