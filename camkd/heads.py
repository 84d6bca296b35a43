"""The teachers' frozen classifier heads, applied to the connected student maps of CA-MKD's intermediate term.

The K heads of one feature shape run as one batched op when each is a global average pool + flatten + one
linear layer (every camkd CIFAR model, ResNet-style torchvision models): the stacked map is pooled once and the K
fc layers are one batched matmul. Other heads run one by one. Heads never train and stay in eval mode.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from camkd.models.base import GlobalPoolHead


class FrozenHead(nn.Module):
    """A teacher's classifier head (global pool + fc) that never trains and stays in eval mode."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head = head.eval()
        for p in self.head.parameters():
            p.requires_grad_(False)

    def train(self, mode: bool = True) -> FrozenHead:
        return super().train(False)

    def forward(self, feature_map: Tensor) -> Tensor:
        return self.head(feature_map)


def linear_of(head: nn.Module) -> nn.Linear | None:
    """The head's fc layer when the head is exactly global average pool → flatten → that layer, else None."""
    if not isinstance(head, GlobalPoolHead) or not head.flatten:
        return None
    pool = head.pool
    if not isinstance(pool, nn.AdaptiveAvgPool2d) or pool.output_size not in (1, (1, 1)):
        return None
    return head.classifier if isinstance(head.classifier, nn.Linear) else None


class FrozenHeads(nn.Module):
    """K frozen heads over the connected student maps [B,K,C,H,W] → logits [K,B,N].

    Stacked (every head a pool + fc): `weight` [K,C,N] and `bias` [K,1,N], frozen parameters (kept out of the
    optimizer and out of DDP's per-step buffer broadcast). Otherwise `heads`, one FrozenHead per teacher.
    """

    def __init__(self, heads: Sequence[nn.Module], channels: int) -> None:
        super().__init__()
        self.count, self.channels = len(heads), int(channels)
        fcs = [linear_of(h) for h in heads]
        self.stacked = all(fc is not None and fc.in_features == channels for fc in fcs) and (
            len({fc.out_features for fc in fcs}) == 1
        )
        if self.stacked:
            with torch.no_grad():
                w = torch.stack([fc.weight.detach().t() for fc in fcs]).contiguous()
                b = torch.stack(
                    [
                        fc.bias.detach() if fc.bias is not None else fc.weight.new_zeros(fc.out_features)
                        for fc in fcs
                    ]
                )
            self.weight = nn.Parameter(w, requires_grad=False)
            self.bias = nn.Parameter(b.unsqueeze(1).contiguous(), requires_grad=False)
        else:
            self.heads = nn.ModuleList(FrozenHead(h) for h in heads)

    def forward(self, per_teacher: Tensor) -> Tensor:
        """Connected student maps [B,K,C,H,W] (teacher k's in [:, k]) → head logits [K,B,N]."""
        if not self.stacked:
            return torch.stack([h(per_teacher[:, k]) for k, h in enumerate(self.heads)])
        pooled = per_teacher.mean((3, 4))  # global average pool, [B,K,C]
        return torch.baddbmm(self.bias, pooled.transpose(0, 1), self.weight)
