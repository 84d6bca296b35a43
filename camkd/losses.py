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

from camkd import closed_form

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


def _denominator(k: int, b: int, normalize: Normalize) -> int:
    if normalize == "official":
        return b * k
    if normalize == "mean":
        return b
    raise ValueError(f"normalize must be 'official' or 'mean', got {normalize!r}")


def _reduce(weighted: Tensor, normalize: Normalize) -> Tensor:
    """weighted: [K,B] per-teacher, per-sample weighted terms."""
    k, b = weighted.shape
    return weighted.sum() / _denominator(k, b, normalize)


def kl_per_sample(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 4.0) -> Tensor:
    """τ²·KL(p_T ‖ p_S) summed over classes, p = softmax(z/τ). [...,B,C] → [...,B]."""
    if student_logits.shape[-2:] != teacher_logits.shape[-2:]:
        raise ValueError(
            f"student_logits {_shape(student_logits)} and teacher_logits {_shape(teacher_logits)} "
            "must agree in their last two dims [B,C]"
        )
    t = float(temperature)
    log_p_s = F.log_softmax(student_logits.float() / t, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.float() / t, dim=-1)
    return (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1) * (t * t)


def weighted_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    weights: Tensor | None,
    temperature: float = 4.0,
    normalize: Normalize = "official",
) -> Tensor:
    """Σ_k Σ_i w_ik·kl_ik / (B·K) ("official") or / B ("mean"); kl_ik = `kl_per_sample`, w = 1 when None.

    student [B,C], teachers [K,B,C], weights [K,B] (no gradient) → scalar. The weights scale the teacher's
    distribution before the class sum, and τ² and the denominator are one factor: the fewest ops for the step.
    Frozen teachers take `closed_form.WeightedKL` (∂L/∂z_s in 4 ops); teachers that need a gradient, autograd.
    """
    _check_teacher_logits(teacher_logits, student_logits)
    k, b, _ = teacher_logits.shape
    t = float(temperature)
    factor = t * t / _denominator(k, b, normalize)
    if weights is not None and weights.requires_grad:
        weights = weights.detach()
    if not teacher_logits.requires_grad:  # frozen teachers: the closed-form gradient (camkd.closed_form)
        return closed_form.WeightedKL.apply(student_logits, teacher_logits, weights, t, factor)
    log_p_s = F.log_softmax(student_logits.float() / t, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.float() / t, dim=-1)
    p_t = log_p_t.exp()
    if weights is not None:
        p_t = p_t * weights.unsqueeze(-1)
    return (p_t * (log_p_t - log_p_s)).sum() * factor


def ce_and_weighted_kl(
    student_logits: Tensor,
    labels: Tensor,
    teacher_logits: Tensor,
    weights: Tensor | None,
    temperature: float = 4.0,
    normalize: Normalize = "official",
    gamma: float = 1.0,
    alpha: float = 1.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """A distillation step's logit terms: (γ·CE + α·KD, CE, KD), KD = `weighted_kl`; CE and KD without gradient.

    student [B,C], labels [B], teachers [K,B,C], weights [K,B] or None. Frozen teachers take
    `closed_form.CrossEntropyAndKL` (∂L/∂z_s in 7 ops whatever K); teachers that need a gradient, autograd.
    """
    _check_teacher_logits(teacher_logits, student_logits)
    _check_labels(labels, student_logits.shape[0], f"student_logits {_shape(student_logits)}")
    k, b, _ = teacher_logits.shape
    t = float(temperature)
    if weights is not None and weights.requires_grad:
        weights = weights.detach()
    if teacher_logits.requires_grad:
        ce = F.cross_entropy(student_logits.float(), labels)
        kd = weighted_kl(student_logits, teacher_logits, weights, t, normalize)
        return gamma * ce + alpha * kd, ce.detach(), kd.detach()
    factor = t * t / _denominator(k, b, normalize)
    return closed_form.CrossEntropyAndKL.apply(
        student_logits, labels, teacher_logits, weights, t, factor, gamma, alpha
    )


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 4.0) -> Tensor:
    """Hinton KD: batchmean τ²·KL(teacher ‖ student). student [B,C], teacher [B,C] → scalar."""
    if teacher_logits.shape != student_logits.shape or student_logits.dim() != 2:
        raise ValueError(
            f"kd_loss expects student_logits [B,C] and teacher_logits [B,C] of one shape, "
            f"got {_shape(student_logits)} and {_shape(teacher_logits)}"
        )
    return weighted_kl(student_logits, teacher_logits.unsqueeze(0), None, temperature)


def _check_confidence_inputs(teacher_logits: Tensor, labels: Tensor) -> None:
    _check_teacher_logits(teacher_logits)
    k, b, _ = teacher_logits.shape
    if k < 2:
        raise ValueError(
            f"confidence weights need at least 2 teachers, got K={k} (teacher_logits {_shape(teacher_logits)}); "
            "with one teacher use the 'kd' strategy"
        )
    _check_labels(labels, b, f"teacher_logits {_shape(teacher_logits)}")


def confidence_weights(teacher_logits: Tensor, labels: Tensor) -> Tensor:
    """CA-MKD per-sample teacher weights. teacher_logits [K,B,C], labels [B] → [K,B].

    w_ik = (1 − softmax_k(CE(z_ik, y_i))) / (K − 1): the weights of one sample sum to 1 and the teacher with
    the larger cross-entropy gets less. Differentiable in `teacher_logits` (the intermediate term relies on it).
    """
    _check_confidence_inputs(teacher_logits, labels)
    k, b, c = teacher_logits.shape
    ce = F.cross_entropy(teacher_logits.float().reshape(k * b, c), labels.repeat(k), reduction="none")
    return torch.rsub(F.softmax(ce.view(k, b), dim=0), 1.0 / (k - 1), alpha=1.0 / (k - 1))  # (1 − s)/(K − 1)


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
    return weighted_kl(student_logits, teacher_logits, weights, temperature, normalize)


def feature_mse(connected: Tensor, teacher: Tensor) -> Tensor:
    """mse = mean over C,H,W of (e − h)², in float32: [...,C,H,W] twice (any float dtypes; e.g. [K,B,C,H,W])
    → [...] (e.g. [K,B])."""
    if connected.shape != teacher.shape or connected.dim() < 4:
        raise ValueError(
            f"connected student features {_shape(connected)} and teacher features {_shape(teacher)} must have "
            "one shape [...,B,C,H,W]"
        )
    # aten's mse_loss without reduction: one op forward and one backward (sub + pow: two and three)
    return torch.ops.aten.mse_loss(connected.float(), teacher, 0).mean((-3, -2, -1))


def weighted_feature_loss(
    mse: Tensor,
    head_logits: Tensor,
    labels: Tensor,
    normalize: Normalize = "official",
    weights: Tensor | None = None,
) -> Tensor:
    """CA-MKD's intermediate term from per-teacher feature MSEs. mse [K,B], head_logits [K,B,C] → scalar.

    u = confidence_weights(head_logits, labels) is NOT detached (as in the official code, gradient flows through
    the frozen heads), unless precomputed `weights` [K,B] are given. L = Σ_i Σ_k u_ik·mse_ik / (B·K).
    The teachers may come in any order, as long as mse, head_logits and weights share it.
    """
    return confidence_weighted_mse(mse, head_logits, labels, normalize, weights)[0]


def confidence_weighted_mse(
    mse: Tensor,
    head_logits: Tensor,
    labels: Tensor,
    normalize: Normalize = "official",
    weights: Tensor | None = None,
    head_gradient: bool = True,
    teacher_logits: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """`weighted_feature_loss` and its weights: mse [K,B], head_logits [K,B,C] → (scalar L_inter, u [K,B], w).

    u = confidence_weights(head_logits, labels), with gradient into head_logits when `head_gradient` (the
    official code), else none; or the given `weights`. w = confidence_weights(teacher_logits, labels) when
    teacher_logits [K,B,C] are given (and no weights), computed with u in the same ops; else None. u and w are
    returned without gradient. Computed by `closed_form.ConfidenceWeightedMSE` (its backward in a few ops
    whatever K); weights that need a gradient themselves take autograd.
    """
    if head_logits.dim() != 3 or mse.shape != head_logits.shape[:2]:
        raise ValueError(f"mse {_shape(mse)} and head_logits {_shape(head_logits)} must be [K,B] and [K,B,C]")
    k, b, _ = head_logits.shape
    if weights is None:
        _check_confidence_inputs(head_logits, labels)
        if teacher_logits is not None and teacher_logits.shape != head_logits.shape:
            raise ValueError(
                f"teacher_logits {_shape(teacher_logits)} must have the head logits' shape {_shape(head_logits)}"
            )
    elif weights.requires_grad:
        return _reduce(weights * mse, normalize), weights.detach(), None
    else:
        teacher_logits = None
    scale = 1.0 / _denominator(k, b, normalize)
    return closed_form.ConfidenceWeightedMSE.apply(
        mse, head_logits, labels, weights, teacher_logits, head_gradient, scale
    )


def camkd_feature_loss(
    connected_student_feats: Sequence[Tensor],
    teacher_feats: Sequence[Tensor],
    head_logits: Tensor,
    labels: Tensor,
    normalize: Normalize = "official",
    weights: Tensor | None = None,
) -> Tensor:
    """Confidence-weighted intermediate (feature) loss, teacher by teacher.

    connected_student_feats: K tensors [B,C_k,H_k,W_k], the student map after teacher k's connector.
    teacher_feats: K tensors of the same shapes. head_logits [K,B,C]: teacher k's frozen head applied to the
    connected student feature k. See `weighted_feature_loss` (the strategy computes the MSEs of teachers of one
    shape stacked, `feature_mse`).
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
        mse.append(feature_mse(s, t))
    return weighted_feature_loss(torch.stack(mse), head_logits, labels, normalize, weights)


def aver_kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 4.0) -> Tensor:
    """AVER: mean over teachers of batchmean τ²·KL. student [B,C], teachers [K,B,C] → scalar."""
    return weighted_kl(student_logits, teacher_logits, None, temperature)


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
    return weighted_kl(student_logits, teacher_logits, weights, temperature)


def dkd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    temperature: float = 4.0,
    alpha: float = 1.0,
    beta: float = 8.0,
) -> Tensor:
    """Decoupled KD (Zhao et al., CVPR 2022): α·TCKD + β·NCKD, each batchmean and scaled by τ².

    teacher_logits is [B,C] (one teacher) or [K,B,C] (several: the mean of the per-teacher DKD losses, computed
    on the stacked teachers at once).
    """
    if teacher_logits.dim() == 3:
        _check_teacher_logits(teacher_logits, student_logits)
    elif teacher_logits.shape != student_logits.shape or student_logits.dim() != 2:
        raise ValueError(
            f"dkd_loss expects student_logits [B,C] and teacher_logits [B,C] or [K,B,C], "
            f"got {_shape(student_logits)} and {_shape(teacher_logits)}"
        )
    else:
        teacher_logits = teacher_logits.unsqueeze(0)
    k, b, c = teacher_logits.shape
    _check_labels(labels, b, f"student_logits {_shape(student_logits)}")
    t = float(temperature)
    s_scaled, t_scaled = student_logits.float() / t, teacher_logits.float() / t
    gt = F.one_hot(labels, c).bool()
    # Target-class KD: binary distribution (p_gt, 1 − p_gt).
    p_s, p_t = F.softmax(s_scaled, -1), F.softmax(t_scaled, -1)
    bin_s = torch.stack([(p_s * gt).sum(-1), (p_s * ~gt).sum(-1)], -1).clamp_min(1e-12)
    bin_t = torch.stack([(p_t * gt).sum(-1), (p_t * ~gt).sum(-1)], -1)
    tckd = F.kl_div(bin_s.log().expand_as(bin_t), bin_t, reduction="sum")
    # Non-target-class KD: distributions over the other classes only.
    log_q_s = F.log_softmax(s_scaled - 1000.0 * gt, -1)
    q_t = F.softmax(t_scaled - 1000.0 * gt, -1)
    nckd = F.kl_div(log_q_s.expand_as(q_t), q_t, reduction="sum")
    return (alpha * tckd + beta * nckd) * (t * t / (b * k))
