"""Shared building blocks for the megatron-stack tests: a tiny spec, a batch, and one
forward/backward through megatron's own pipeline schedule at any TP x PP layout."""
from __future__ import annotations

import torch

from megatron_tip.models import ModelSpec

V = 256  # divisible by 128*TP for TP<=2, so no layout-dependent vocab padding in CE
SPEC = ModelSpec(family="qwen3", num_layers=4, hidden_size=64, num_attention_heads=4,
                 num_query_groups=2, ffn_hidden_size=128, vocab_size=V, qk_layernorm=True)
MICRO, SEQ, NUM_MB = 2, 16, 2


def make_batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (MICRO * NUM_MB, SEQ + 1), generator=g)
    return ids[:, :-1].contiguous(), ids[:, 1:].contiguous()


def reference_weights(spec: ModelSpec = SPEC, seed: int = 7) -> dict[str, torch.Tensor]:
    """Canonical weights from a TP=1 build (single process, run inside a rank)."""
    from megatron_tip.distributed import init_parallel
    from megatron_tip.models import build_gpt_model
    from megatron_tip.models.sharding import gather_canonical_state_dict

    init_parallel(1, seed=seed)
    model = build_gpt_model(spec)
    # Non-trivial norm weights so a wrong layernorm mapping cannot hide behind ones.
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "layernorm" in n or n.endswith("norm.weight"):
                p.add_(0.1 * torch.randn_like(p))
    return gather_canonical_state_dict(model, vocab_size=spec.vocab_size)


def build_layout(ctx, full: dict, spec: ModelSpec = SPEC):
    from megatron_tip.models import build_gpt_model
    from megatron_tip.models.sharding import layer_offset, load_canonical_state_dict

    model = build_gpt_model(spec, tp=ctx.tp, pp=ctx.pp, pp_rank=ctx.pp_rank)
    load_canonical_state_dict(model, full, tp=ctx.tp, tp_rank=ctx.tp_rank,
                              layer_offset=layer_offset(spec.num_layers, pp=ctx.pp, pp_rank=ctx.pp_rank),
                              vocab_size=spec.vocab_size)
    return model


def wrap_ddp(model):
    """megatron DDP + finalize_model_grads, as training uses them (TP-partial grads such as
    qk-layernorm are all-reduced there)."""
    from megatron.core.distributed import (DistributedDataParallel, DistributedDataParallelConfig,
                                           finalize_model_grads)

    model.config.finalize_model_grads_func = finalize_model_grads
    return DistributedDataParallel(model.config, DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=False),
        module=model)


def main_grads(ddp_model) -> dict:
    return {n: p.main_grad for n, p in ddp_model.module.named_parameters()}


def forward_backward(model, ids: torch.Tensor, labels: torch.Tensor, *, forward_only: bool = False):
    """Mean token CE over the batch via megatron's schedule; returns the loss on the last stage."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    pos = torch.arange(SEQ).unsqueeze(0).expand(MICRO, -1)
    mbs = [(ids[i * MICRO:(i + 1) * MICRO], labels[i * MICRO:(i + 1) * MICRO]) for i in range(NUM_MB)]

    def step(data_iter, m):
        x, y = next(data_iter)
        out = m(x, pos, None, labels=y)

        def loss_func(per_token):
            loss = per_token.float().mean()
            return loss, {"loss": loss.detach()}

        return out, loss_func

    outs = get_forward_backward_func()(
        forward_step_func=step, data_iterator=iter(mbs), model=[model], num_microbatches=NUM_MB,
        seq_length=SEQ, micro_batch_size=MICRO, forward_only=forward_only)
    if not outs:
        return None
    return float(torch.stack([o["loss"] for o in outs]).mean())
