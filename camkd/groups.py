"""CA-MKD's teachers grouped by feature shape: per group one stacked connector and one set of frozen heads.

Teachers whose feature maps share a shape (C,H,W) form one group; mixed shapes form several. A group turns the
student map into its teachers' head logits [K_g,B,N] and feature MSEs [K_g,B] with a fixed number of ops, so
adding a teacher of an existing shape adds data, not ops. Outputs come in *group order* (teachers of group 0, then
group 1, ...; `order`); the loss is a sum over teachers, so only per-teacher reports need the order.
Also converts the per-teacher state of camkd ≤ 0.1 (`connectors.<i>.transfer.*`, `heads.<i>.head.*`).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from camkd import closed_form, losses
from camkd.connectors import Connector
from camkd.heads import FrozenHeads

# A stacked connector's trainable tensors, and the per-teacher (camkd ≤ 0.1) names they stack.
STACKED = {
    "connector.conv.weight": "transfer.0.weight",
    "connector.conv.bias": "transfer.0.bias",
    "connector.bn.weight": "transfer.1.weight",
    "connector.bn.bias": "transfer.1.bias",
}
STACKED_BUFFERS = {
    "connector.bn.running_mean": "transfer.1.running_mean",
    "connector.bn.running_var": "transfer.1.running_var",
}


class TeacherGroup(nn.Module):
    """The teachers `members` (indices in the strategy's order) that share one feature shape."""

    def __init__(
        self, student_channels: int, shape: Sequence[int], heads: Sequence[nn.Module], members: Sequence[int]
    ) -> None:
        super().__init__()
        self.members = tuple(int(i) for i in members)
        self.connector = Connector(student_channels, shape, len(self.members))
        self.heads = FrozenHeads(heads, self.connector.teacher_shape[0])

    def forward(self, student_features: Tensor, teacher_features: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        """→ head logits [K_g,B,N] (teacher k's frozen head on its connected student map) and mse [K_g,B]
        (mean over C,H,W of (connected − teacher)², in float32)."""
        b = student_features.shape[0]
        expected = (b, *self.connector.teacher_shape)
        for i in self.members:
            f = teacher_features[i]
            if tuple(f.shape) != expected:
                raise ValueError(
                    f"teacher {i}: connected student feature [{','.join(map(str, expected))}] does not match "
                    f"teacher feature [{','.join(map(str, f.shape))}]; the cache's feature shape must be the one "
                    "the strategy was built with"
                )
        if len(self.members) == 1:
            target = teacher_features[self.members[0]].unsqueeze(1)
        else:
            target = torch.stack([teacher_features[i] for i in self.members], dim=1)
        if self.heads.stacked:  # the connector's ReLU, heads and MSEs with their closed-form gradient
            x = self.connector.pre_activation(student_features)  # [B,K·C,H,W]
            return closed_form.HeadsAndMSE.apply(x, target, self.heads.weight, self.heads.bias)
        per_teacher = self.connector.per_teacher(self.connector(student_features))  # [B,K,C,H,W]
        mse = losses.feature_mse(per_teacher, target).t()  # [B,K] → [K,B]: no copy, forward or backward
        return self.heads(per_teacher), mse


class TeacherGroups(nn.Module):
    """All of a CA-MKD strategy's teachers, grouped by feature shape (groups in order of first appearance)."""

    def __init__(
        self,
        student_channels: int,
        teacher_shapes: Sequence[Sequence[int]],
        teacher_heads: Sequence[nn.Module],
    ) -> None:
        super().__init__()
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, shape in enumerate(teacher_shapes):
            by_shape.setdefault(tuple(int(v) for v in shape), []).append(i)
        self.groups = nn.ModuleList(
            TeacherGroup(student_channels, shape, [teacher_heads[i] for i in members], members)
            for shape, members in by_shape.items()
        )
        self.count = len(teacher_shapes)
        self.order = [i for g in self.groups for i in g.members]
        self.in_order = self.order == list(range(self.count))
        # teacher order → group order, as an index tensor built once (moves with the module); none when in order
        order = None if self.in_order else torch.tensor(self.order, dtype=torch.long)
        self.register_buffer("to_group_order", order, persistent=False)

    def forward(self, student_features: Tensor, teacher_features: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        """→ head logits [K,B,N] and mse [K,B], both in group order (`order`)."""
        if len(teacher_features) != self.count:
            raise ValueError(f"got {len(teacher_features)} teacher feature maps for {self.count} teachers")
        outs = [g(student_features, teacher_features) for g in self.groups]
        if len(outs) == 1:
            return outs[0]
        return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])

    def in_group_order(self, per_teacher: Tensor) -> Tensor:
        """[K,...] in the strategy's teacher order → group order (no op when the orders agree)."""
        return per_teacher if self.in_order else per_teacher.index_select(0, self.to_group_order)

    # ------------------------------------------------------------------ camkd ≤ 0.1: one module per teacher
    def stack_per_teacher(self, per_teacher: Sequence[Sequence[Tensor | None]]) -> list[Tensor | None]:
        """For each teacher its tensors in `STACKED` order → each group's stacked tensors, group after group
        (None where a member has none, e.g. a momentum buffer before the connector's first step)."""
        out: list[Tensor | None] = []
        for g in self.groups:
            for j in range(len(STACKED)):
                parts = [per_teacher[i][j] for i in g.members]
                out.append(None if any(p is None for p in parts) else torch.cat(parts))
        return out

    def convert_legacy_state(self, state: dict, prefix: str) -> bool:
        """Rewrite, in place, a camkd ≤ 0.1 state under `prefix` (`connectors.<i>.transfer.*`,
        `heads.<i>.head.*`) into this module's keys (under `prefix + 'teacher_groups.'`). True if it did."""
        if f"{prefix}connectors.0.transfer.0.weight" not in state:
            return False
        found = sum(
            1 for k in state if k.startswith(f"{prefix}connectors.") and k.endswith("transfer.0.weight")
        )
        if found != self.count:
            raise ValueError(
                f"a per-teacher CA-MKD state with {found} connectors cannot load into a strategy of {self.count} "
                "teachers: load it with the teachers it was trained with"
            )
        names = {**STACKED, **STACKED_BUFFERS}
        for gi, g in enumerate(self.groups):
            new = f"{prefix}teacher_groups.groups.{gi}."
            for key, old in names.items():
                state[new + key] = torch.cat([state.pop(f"{prefix}connectors.{i}.{old}") for i in g.members])
            counts = [state.pop(f"{prefix}connectors.{i}.transfer.1.num_batches_tracked") for i in g.members]
            state[new + "connector.bn.num_batches_tracked"] = counts[0]
            heads = [_pop_prefixed(state, f"{prefix}heads.{i}.head.") for i in g.members]
            self._convert_heads(g, heads, new + "heads.", state)
        warnings.warn(
            f"converted a per-teacher CA-MKD state ({self.count} teachers: connectors.<i>.*, heads.<i>.*, "
            f"written by camkd <= 0.1) into {len(self.groups)} stacked teacher group(s); save it again to keep "
            "the new layout",
            stacklevel=2,
        )
        return True

    @staticmethod
    def _convert_heads(group: TeacherGroup, heads: list[dict], new: str, state: dict) -> None:
        if not group.heads.stacked:
            for j, h in enumerate(heads):
                for k, v in h.items():
                    state[f"{new}heads.{j}.head.{k}"] = v
            return
        state[new + "weight"] = torch.stack([h["classifier.weight"].t() for h in heads]).contiguous()
        biases = [
            h.get("classifier.bias", h["classifier.weight"].new_zeros(h["classifier.weight"].shape[0]))
            for h in heads
        ]
        state[new + "bias"] = torch.stack(biases).unsqueeze(1).contiguous()


def _pop_prefixed(state: dict, prefix: str) -> dict:
    return {k[len(prefix) :]: state.pop(k) for k in [k for k in state if k.startswith(prefix)]}
