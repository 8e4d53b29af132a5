"""The TIP distillation loss in megatron-core's per-token loss contract.

L = (1/|T|) sum_{t in T} KL(P_S(.|c_t) || P_T(.|c_t)) over the kept set T of the *global* batch.
Each micro-batch returns (sum of its kept KLs, its kept count, report); with
``config.calculate_per_token_loss`` megatron's ``finalize_model_grads`` all-reduces the counts
over data-parallel ranks and divides the gradients by the global |T| (docs/method.md §3: the normalizer
is the global count of kept tokens, not a per-rank or per-micro-batch mean).
"""
from __future__ import annotations

from typing import Optional

import torch

from megatron_tip.ops import vocab_parallel_reverse_kl


def kept_reverse_kl_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    tp_group=None,
    vocab_size: Optional[int] = None,
    chunk_size: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Megatron loss triple for the kept positions of one micro-batch.

    student_logits: [n, V/TP] at kept positions (graph attached); teacher_logits: [n, V/TP]
    (constant). Returns (loss_sum fp32 scalar, n as an int tensor, report with the detached
    [sum, count] pair that megatron's schedule sums over micro-batches).
    """
    per_token = vocab_parallel_reverse_kl(student_logits, teacher_logits, tp_group=tp_group,
                                          vocab_size=vocab_size, chunk_size=chunk_size)
    loss_sum = per_token.sum()
    n = torch.tensor(per_token.numel(), dtype=torch.int)
    report = {"kept_rkl": torch.stack([loss_sum.detach(), n.float()])}
    return loss_sum, n, report
