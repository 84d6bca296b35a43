"""The student's optimizer: SGD in as few ops per step as torch allows, chosen once where it is built.

Fused (one kernel for every parameter) where torch has fused SGD for the parameters' device, else foreach; the
same update as torch's per-parameter loop. Also loads an optimizer state written by camkd <= 0.1.
"""

from __future__ import annotations

import warnings

import torch

from camkd.strategies import Distiller


def _fused_devices() -> set[str]:
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

        return set(_get_fused_kernels_supported_devices())
    except ImportError:  # pragma: no cover - an older or newer torch without the helper
        return {"cuda"}


def build_optimizer(
    params, lr: float, momentum: float = 0.9, nesterov: bool = True, weight_decay: float = 5e-4
) -> torch.optim.SGD:
    """SGD (the paper's recipe) in as few ops per step as torch allows, chosen once: fused (one kernel for every
    parameter) where torch has fused SGD for the parameters' device, else foreach (a handful of ops whatever the
    parameter count). The same update as torch's per-parameter loop. Momentum buffers exist from the start, zeros
    (with no dampening the first update is the same as torch's buffer = gradient): parameters that join late, as
    CA-MKD's connectors after the warm-up, would otherwise break the fused kernel; a loaded state is filled in
    the same way."""
    params = [p for p in params if p.requires_grad]
    fused = bool(params) and all(p.device.type in _fused_devices() and p.is_floating_point() for p in params)
    optimizer = torch.optim.SGD(
        params,
        lr=lr,
        momentum=momentum,
        nesterov=nesterov,
        weight_decay=weight_decay,
        foreach=not fused,
        fused=fused or None,
    )
    if fused and momentum:
        fill_momentum_buffers(optimizer)
        optimizer.register_load_state_dict_post_hook(fill_momentum_buffers)
    return optimizer


def fill_momentum_buffers(optimizer: torch.optim.Optimizer, *_) -> None:
    """A zero momentum buffer for every SGD parameter without one (no dampening: the same first update)."""
    for group in optimizer.param_groups:
        if group["momentum"] and group.get("dampening", 0) == 0:
            for p in group["params"]:
                state = optimizer.state[p]
                if state.get("momentum_buffer") is None:
                    state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict, distiller: Distiller) -> None:
    """`optimizer.load_state_dict(state)`; a state written by camkd <= 0.1 (CA-MKD with one connector per teacher:
    4 tensors per teacher after the student's) is converted first, with a warning (its momentum buffers stacked
    per teacher group as the connectors are)."""
    saved = state["param_groups"][0]["params"] if len(state["param_groups"]) == 1 else None
    params = optimizer.param_groups[0]["params"]
    groups = getattr(distiller.strategy, "teacher_groups", None)
    if saved is None or len(saved) == len(params) or groups is None:
        optimizer.load_state_dict(state)
        return
    mine = {id(p) for p in groups.parameters()}
    others = [i for i, p in enumerate(params) if id(p) not in mine]
    n_old = len(others) + 4 * groups.count
    if len(saved) != n_old or others != list(range(len(others))):
        optimizer.load_state_dict(state)  # torch's own error names the mismatch
        return
    position = {pid: i for i, pid in enumerate(saved)}
    old = {position[pid]: v for pid, v in state["state"].items()}
    per_teacher = [
        [old.get(len(others) + 4 * i + j, {}).get("momentum_buffer") for j in range(4)]
        for i in range(groups.count)
    ]
    new_state = {i: old[i] for i in range(len(others)) if i in old}
    for j, buf in enumerate(groups.stack_per_teacher(per_teacher)):
        if buf is not None:
            new_state[len(others) + j] = {"momentum_buffer": buf}
    group = dict(state["param_groups"][0], params=list(range(len(params))))
    warnings.warn(
        f"converted an optimizer state of per-teacher CA-MKD connectors ({groups.count} teachers, written by "
        f"camkd <= 0.1) into {len(groups.groups)} stacked teacher group(s)",
        stacklevel=2,
    )
    optimizer.load_state_dict({"state": new_state, "param_groups": [group]})
