"""Distillation losses as pure functions: tensors in, scalar tensors out.

Semantics follow the CA-MKD authors' official code (see docs/architecture.md, "The method"). Shapes: B samples, C classes,
K teachers. Nothing here holds state, touches I/O or imports Ray.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

Normalize = Literal["official", "mean"]


def _shape(t: Tensor) -> str:
    return "[" + ",".join(str(d) for d in t.shape) + "]"


def _check_labels(labels: Tensor, batch: int, what: str) -> None:
    if labels.dim() != 1 or labels.shape[0] != batch:
        raise ValueError(f"labels must be [B] with B={batch} (from {what}), got labels {_shape(labels)}")


def _check_teacher_logits(teacher_logits: Tensor, student_logits: Tensor | None = None) -> None:
    if teacher_logits.dim() != 3:
        raise ValueError(f"teacher_logits must be [K,B,C], got {_shape(teacher_logits)}")
    if student_logits is not None and (
        student_logits.dim() != 2 or student_logits.shape != teacher_logits.shape[1:]
    ):
        raise ValueError(
            f"student_logits {_shape(student_logits)} does not match teacher_logits {_shape(teacher_logits)}: "
            "expected student [B,C] and teachers [K,B,C] with the same B and C"
        )


def _reduce(weighted: Tensor, normalize: Normalize) -> Tensor:
    """weighted: [K,B] per-teacher, per-sample weighted terms."""
    k, b = weighted.shape
    if normalize == "official":
        return weighted.sum() / (b * k)
    if normalize == "mean":
        return weighted.sum() / b
    raise ValueError(f"normalize must be 'official' or 'mean', got {normalize!r}")


def kl_per_sample(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 4.0) -> Tensor:
    """τ²·KL(p_T ‖ p_S) summed over classes, p = softmax(z/τ). [...,B,C] → [...,B]."""
    if student_logits.shape[-2:] != teacher_logits.shape[-2:]:
        raise ValueError(
            f"student_logits {_shape(student_logits)} and teacher_logits {_shape(teacher_logits)} "
            "must agree in their last two dims [B,C]"
        )
    t = float(temperature)
    log_p_s = F.log_softmax(student_logits.float() / t, dim=-1)
    p_t = F.softmax(teacher_logits.float() / t, dim=-1)
    return F.kl_div(log_p_s.expand_as(p_t), p_t, reduction="none").sum(-1) * (t * t)


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 4.0) -> Tensor:
    """Hinton KD: batchmean τ²·KL(teacher ‖ student). student [B,C], teacher [B,C] → scalar."""
    if teacher_logits.shape != student_logits.shape or student_logits.dim() != 2:
        raise ValueError(
            f"kd_loss expects student_logits [B,C] and teacher_logits [B,C] of one shape, "
            f"got {_shape(student_logits)} and {_shape(teacher_logits)}"
        )
    return kl_per_sample(student_logits, teacher_logits, temperature).sum() / student_logits.shape[0]


def confidence_weights(teacher_logits: Tensor, labels: Tensor) -> Tensor:
    """CA-MKD per-sample teacher weights. teacher_logits [K,B,C], labels [B] → [K,B].

    w_ik = (1 − softmax_k(CE(z_ik, y_i))) / (K − 1): the weights of one sample sum to 1 and the teacher with
    the larger cross-entropy gets less. Differentiable in `teacher_logits` (the intermediate term relies on it).
    """
    _check_teacher_logits(teacher_logits)
    k, b, c = teacher_logits.shape
    if k < 2:
        raise ValueError(
            f"confidence weights need at least 2 teachers, got K={k} (teacher_logits {_shape(teacher_logits)}); "
            "with one teacher use the 'kd' strategy"
        )
    _check_labels(labels, b, f"teacher_logits {_shape(teacher_logits)}")
    ce = F.cross_entropy(teacher_logits.float().reshape(k * b, c), labels.repeat(k), reduction="none")
    return (1.0 - F.softmax(ce.view(k, b), dim=0)) / (k - 1)


def camkd_kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    temperature: float = 4.0,
    normalize: Normalize = "official",
    weights: Tensor | None = None,
) -> Tensor:
    """Confidence-weighted KD. student [B,C], teachers [K,B,C], labels [B] → scalar.

    L = Σ_i Σ_k w_ik·kl_ik / (B·K) ("official") or / B ("mean": the plain weighted mean, as Σ_k w_ik = 1).
    Teachers are frozen, so w carries no gradient. Pass precomputed `weights` [K,B] to avoid recomputing them.
    """
    _check_teacher_logits(teacher_logits, student_logits)
    if weights is None:
        weights = confidence_weights(teacher_logits.detach(), labels)
    return _reduce(weights.detach() * kl_per_sample(student_logits, teacher_logits, temperature), normalize)


def camkd_feature_loss(
    connected_student_feats: Sequence[Tensor],
    teacher_feats: Sequence[Tensor],
    head_logits: Tensor,
    labels: Tensor,
    normalize: Normalize = "official",
    weights: Tensor | None = None,
) -> Tensor:
    """Confidence-weighted intermediate (feature) loss.

    connected_student_feats: K tensors [B,C_k,H_k,W_k], the student map after teacher k's connector.
    teacher_feats: K tensors of the same shapes. head_logits [K,B,C]: teacher k's frozen head applied to the
    connected student feature k. u = confidence_weights(head_logits, labels) is NOT detached (as in the official
    code, gradient flows through the frozen heads). mse_ik = mean over C,H,W. L = Σ_i Σ_k u_ik·mse_ik / (B·K).
    """
    k = len(teacher_feats)
    if len(connected_student_feats) != k:
        raise ValueError(
            f"got {len(connected_student_feats)} connected student features for {k} teacher features"
        )
    if head_logits.dim() != 3 or head_logits.shape[0] != k:
        raise ValueError(f"head_logits must be [K,B,C] with K={k}, got {_shape(head_logits)}")
    b = head_logits.shape[1]
    mse = []
    for i, (s, t) in enumerate(zip(connected_student_feats, teacher_feats)):
        if s.shape != t.shape or s.shape[0] != b:
            raise ValueError(
                f"teacher {i}: connected student feature {_shape(s)} does not match teacher feature {_shape(t)} "
                f"(batch {b} from head_logits)"
            )
        mse.append((s.float() - t.float()).pow(2).reshape(b, -1).mean(-1))
    if weights is None:
        weights = confidence_weights(head_logits, labels)
    return _reduce(weights * torch.stack(mse), normalize)


def aver_kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 4.0) -> Tensor:
    """AVER: mean over teachers of batchmean τ²·KL. student [B,C], teachers [K,B,C] → scalar."""
    _check_teacher_logits(teacher_logits, student_logits)
    return kl_per_sample(student_logits, teacher_logits, temperature).sum(-1).mean() / student_logits.shape[0]


def entropy_weights(teacher_logits: Tensor) -> Tensor:
    """EBKD weights w_ik = 1 − H_ik / Σ_j H_ij, H = entropy of softmax(z) at τ = 1. [K,B,C] → [K,B]."""
    _check_teacher_logits(teacher_logits)
    log_p = F.log_softmax(teacher_logits.float(), dim=-1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    return 1.0 - entropy / entropy.sum(0, keepdim=True)


def ebkd_kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor | None = None,
    temperature: float = 4.0,
    weights: Tensor | None = None,
) -> Tensor:
    """Entropy-based KD: Σ_i Σ_k w_ik·kl_ik / (B·K) with the label-free `entropy_weights`.

    `labels` are not used by EBKD's weights; they are accepted (and shape-checked) so every multi-teacher
    loss has the same call signature.
    """
    _check_teacher_logits(teacher_logits, student_logits)
    if labels is not None:
        _check_labels(labels, student_logits.shape[0], f"student_logits {_shape(student_logits)}")
    if weights is None:
        weights = entropy_weights(teacher_logits.detach())
    return _reduce(weights * kl_per_sample(student_logits, teacher_logits, temperature), "official")


def dkd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    temperature: float = 4.0,
    alpha: float = 1.0,
    beta: float = 8.0,
) -> Tensor:
    """Decoupled KD (Zhao et al., CVPR 2022): α·TCKD + β·NCKD, each batchmean and scaled by τ².

    teacher_logits is [B,C] (one teacher) or [K,B,C] (several: the mean of the per-teacher DKD losses).
    """
    if teacher_logits.dim() == 3:
        _check_teacher_logits(teacher_logits, student_logits)
        return torch.stack(
            [dkd_loss(student_logits, t, labels, temperature, alpha, beta) for t in teacher_logits]
        ).mean()
    if teacher_logits.shape != student_logits.shape or student_logits.dim() != 2:
        raise ValueError(
            f"dkd_loss expects student_logits [B,C] and teacher_logits [B,C] or [K,B,C], "
            f"got {_shape(student_logits)} and {_shape(teacher_logits)}"
        )
    b = student_logits.shape[0]
    _check_labels(labels, b, f"student_logits {_shape(student_logits)}")
    t = float(temperature)
    s_scaled, t_scaled = student_logits.float() / t, teacher_logits.float() / t
    gt = F.one_hot(labels, student_logits.shape[1]).bool()
    # Target-class KD: binary distribution (p_gt, 1 − p_gt).
    p_s, p_t = F.softmax(s_scaled, -1), F.softmax(t_scaled, -1)
    bin_s = torch.stack([(p_s * gt).sum(-1), (p_s * ~gt).sum(-1)], -1).clamp_min(1e-12)
    bin_t = torch.stack([(p_t * gt).sum(-1), (p_t * ~gt).sum(-1)], -1)
    tckd = F.kl_div(bin_s.log(), bin_t, reduction="sum") * (t * t) / b
    # Non-target-class KD: distributions over the other classes only.
    log_q_s = F.log_softmax(s_scaled - 1000.0 * gt, -1)
    q_t = F.softmax(t_scaled - 1000.0 * gt, -1)
    nckd = F.kl_div(log_q_s, q_t, reduction="sum") * (t * t) / b
    return alpha * tckd + beta * nckd
