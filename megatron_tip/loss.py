"""The TIP distillation loss in megatron-core's per-token loss contract.

L = (1/|T|) sum_{t in T} KL(P_S(.|c_t) || P_T(.|c_t)) over the kept set T of the *global* batch.
Each micro-batch returns (sum of its kept KLs, its kept count, report); with
``config.calculate_per_token_loss`` megatron's ``finalize_model_grads`` all-reduces the counts
over data-parallel ranks and divides the gradients by the global |T| (docs/method.md §3: the normalizer
is the global count of kept tokens, not a per-rank or per-micro-batch mean).

Optional per-token weights w_t turn the sum into Σ_{t in T} w_t·KL_t with the same normalizer |T|;
``selection.weighting: inverse_inclusion`` uses w_t = |T| / (N·π_t), so the loss is the unbiased
Horvitz–Thompson estimate (1/N) Σ_{t in T} KL_t/π_t of the all-token mean (``selection.inclusion``).
"""
from __future__ import annotations

from typing import Optional

import torch

from megatron_tip.ops import vocab_parallel_linear_reverse_kl, vocab_parallel_reverse_kl


def kept_reverse_kl_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    tp_group=None,
    vocab_size: Optional[int] = None,
    chunk_size: Optional[int] = None,
    weights: Optional[torch.Tensor] = None,
    impl: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Megatron loss triple for the kept positions of one micro-batch.

    student_logits: [n, V/TP] at kept positions (graph attached); teacher_logits: [n, V/TP]
    (constant); weights: optional constant [n] per-token loss weights (None = 1). Returns
    (loss_sum = Σ w·KL fp32 scalar, n as an int tensor, report with the detached [sum, count]
    pair that megatron's schedule sums over micro-batches).
    """
    per_token = vocab_parallel_reverse_kl(student_logits, teacher_logits, tp_group=tp_group,
                                          vocab_size=vocab_size, chunk_size=chunk_size, impl=impl)
    return _loss_triple(per_token, weights)


def kept_linear_reverse_kl_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    *,
    tp_group=None,
    vocab_size: int,
    chunk_size: Optional[int] = None,
    weights: Optional[torch.Tensor] = None,
    impl: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """:func:`kept_reverse_kl_loss` from final hidden states: the output layers are fused into the loss.

    student_hidden: [n, H_S] at kept positions (graph attached); student_weight: its output
    weight shard [V/TP, H_S] (gets a gradient); teacher_hidden [n, H_T] and teacher_weight
    [V/TP, H_T] are constants. No [n, V/TP] logits are held: memory stays flat in n.
    """
    per_token = vocab_parallel_linear_reverse_kl(student_hidden, student_weight, teacher_hidden, teacher_weight,
                                                 tp_group=tp_group, vocab_size=vocab_size, chunk_size=chunk_size,
                                                 impl=impl)
    return _loss_triple(per_token, weights)


def _loss_triple(per_token: torch.Tensor, weights: Optional[torch.Tensor]):
    if weights is not None:
        if weights.shape != per_token.shape:
            raise ValueError(f"weights has shape {tuple(weights.shape)}, expected {tuple(per_token.shape)}")
        per_token = per_token * weights.detach().to(per_token.dtype)
    loss_sum = per_token.sum()
    n = torch.tensor(per_token.numel(), dtype=torch.int, device=per_token.device)
    report = {"kept_rkl": torch.stack([loss_sum.detach(), n.float()])}
    return loss_sum, n, report
