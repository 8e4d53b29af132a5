"""Shared cases for test_selection_topk.py: Exact distributed top-k and quantiles vs a single-process reference on the concatenation."""
import torch


def ref_topk_mask(scores: torch.Tensor, valid: torch.Tensor, k: int) -> torch.Tensor:
    """First k of a stable descending sort of the valid scores (ties: lower index first)."""
    vi = valid.nonzero().flatten()
    order = torch.sort(scores[vi] + 0.0, descending=True, stable=True).indices[:k]
    out = torch.zeros_like(valid)
    out[vi[order]] = True
    return out
