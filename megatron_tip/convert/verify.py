"""Logit comparison between an HF model and its megatron conversion."""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist


def megatron_logits(model: torch.nn.Module, input_ids: torch.Tensor, *, tp_group=None,
                    is_last_stage: bool = True, vocab_size: int) -> Optional[torch.Tensor]:
    """Full-vocab logits [B, S, vocab_size] (fp32) of one forward through megatron's schedule.

    Works at any TP x PP (p2p between stages); returns None on ranks that are not the last stage.
    The TP-sharded [B, S, V_padded/TP] output is all-gathered and cut to the true vocab.
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    b, s = input_ids.shape
    pos = torch.arange(s, device=input_ids.device).unsqueeze(0).expand(b, -1)

    def step(data_iter, m):
        out = m(next(data_iter), pos, None)
        return out, lambda o: (o.float().sum() * 0, {"logits": o.detach().float()})

    with torch.no_grad():
        outs = get_forward_backward_func()(
            forward_step_func=step, data_iterator=iter([input_ids]), model=[model], num_microbatches=1,
            seq_length=s, micro_batch_size=b, forward_only=True)
    if not is_last_stage:
        return None
    local = outs[0]["logits"]
    tp = dist.get_world_size(tp_group) if tp_group is not None else 1
    if tp > 1:
        shards = [torch.empty_like(local) for _ in range(tp)]
        dist.all_gather(shards, local.contiguous(), group=tp_group)
        local = torch.cat(shards, dim=-1)
    return local[..., :vocab_size]


def hf_logits(hf_dir: str, input_ids: torch.Tensor) -> torch.Tensor:
    """fp32 logits [B, S, V] of the HF model in ``hf_dir`` (eager attention, no cache)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32,
                                                 attn_implementation="eager")
    model.eval()
    with torch.no_grad():
        return model(input_ids=input_ids, use_cache=False).logits.float()


def compare_logits(ref: torch.Tensor, test: torch.Tensor) -> dict[str, float]:
    """max |Δlogit| and mean KL(ref || test) over positions (natural log)."""
    if ref.shape != test.shape:
        raise ValueError(f"logit shapes differ: {tuple(ref.shape)} vs {tuple(test.shape)}")
    lp, lq = ref.double().log_softmax(-1), test.double().log_softmax(-1)
    kl = (lp.exp() * (lp - lq)).sum(-1).mean()
    return {"max_abs_diff": float((ref.double() - test.double()).abs().max()), "mean_kl": float(kl)}


def megatron_checkpoint_logits(megatron_dir: str, input_ids: torch.Tensor, *, tp: int = 1, pp: int = 1,
                               timeout: float = 600.0) -> torch.Tensor:
    """Logits of a megatron checkpoint dir loaded at TP x PP (spawns tp*pp gloo ranks)."""
    from megatron_tip.checkpoint.model import check_integrity
    from megatron_tip.launch import run_distributed

    check_integrity(megatron_dir, collective=False)  # one error line, before any rank starts

    def rank_fn(rank, world):
        from megatron_tip.checkpoint.model import load_megatron_checkpoint, read_checkpoint_info
        from megatron_tip.distributed import init_parallel
        from megatron_tip.models import build_gpt_model

        spec, _ = read_checkpoint_info(megatron_dir)
        ctx = init_parallel(tp, pp=pp)
        model = build_gpt_model(spec, tp=tp, pp=pp, pp_rank=ctx.pp_rank)  # fp32 for comparison
        load_megatron_checkpoint(model, megatron_dir, verify=False)
        out = megatron_logits(model, input_ids, tp_group=ctx.tp_group,
                              is_last_stage=ctx.is_last_stage, vocab_size=spec.vocab_size)
        return out if ctx.tp_rank == 0 else None

    outs = [o for o in run_distributed(rank_fn, tp * pp, timeout=timeout) if o is not None]
    return outs[0]
