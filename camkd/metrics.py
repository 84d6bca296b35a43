"""Classification metrics on plain tensors (counts, so they can be summed across workers before dividing)."""

from __future__ import annotations

import torch
from torch import Tensor


def topk_correct(logits: Tensor, labels: Tensor, ks: tuple[int, ...] = (1, 5)) -> list[int]:
    """Number of samples whose label is among the top-k logits, for each k (k is capped at C)."""
    max_k = min(max(ks), logits.shape[-1])
    top = logits.topk(max_k, dim=-1).indices
    hits = top.eq(labels.unsqueeze(-1))
    return [int(hits[:, : min(k, max_k)].any(-1).sum()) for k in ks]


def accuracy(logits: Tensor, labels: Tensor) -> float:
    """Top-1 accuracy in [0, 1]."""
    if labels.numel() == 0:
        return 0.0
    return float((logits.argmax(-1) == labels).float().mean())


@torch.no_grad()
def per_class_mean(weights: Tensor, labels: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    """Sum of per-sample weights [K,B] per class → ([K,C] sums, [C] counts); divide after reducing."""
    k = weights.shape[0]
    sums = torch.zeros(k, num_classes, dtype=torch.float64, device=weights.device)
    sums.index_add_(1, labels, weights.double())
    counts = torch.bincount(labels, minlength=num_classes).to(torch.float64)
    return sums, counts
