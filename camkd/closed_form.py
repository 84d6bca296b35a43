"""Distillation terms with hand-written backward passes: the closed-form gradient in fewer ops than autograd's chain.

On a launch-bound GPU every ATen op of a step is a kernel launch; these `torch.autograd.Function`s compute the same
values as the formulas in `camkd.losses` and return their gradients in a few fused ops (tests: equal to autograd's
to 1e-6, and `torch.autograd.gradcheck` in float64). Frozen inputs (teacher logits and maps, the heads' weights)
get no gradient: callers route a teacher that needs one through autograd. Pure torch: never imports Ray.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

_NONE, _MEAN, _IGNORE = 0, 1, -100  # nll_loss's reduction codes and its default ignore_index


def _float(t: Tensor) -> Tensor:
    """float16/bfloat16 → float32 (the losses' precision); float32 and float64 as they are (gradcheck)."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _log_softmax_backward(grad: Tensor, log_p: Tensor) -> Tensor:
    """grad − softmax·Σ_c grad (over the last dim): log_softmax's backward, one op."""
    return torch.ops.aten._log_softmax_backward_data(grad, log_p, -1, log_p.dtype)


def _weighted_kl(student: Tensor, teacher: Tensor, weights: Tensor | None, t: float, factor: float):
    """→ (log p_s [B,C], w·p_t [K,B,C], the weighted KL): `WeightedKL`'s forward."""
    log_p_s = F.log_softmax(_float(student) / t, dim=-1)
    log_p_t = F.log_softmax(_float(teacher) / t, dim=-1)
    p_t = log_p_t.exp()
    if weights is not None:
        p_t = p_t * weights.unsqueeze(-1)
    return log_p_s, p_t, (p_t * (log_p_t - log_p_s)).sum() * factor


def _weighted_kl_grad(log_p_s: Tensor, p_t: Tensor, grad: Tensor, scale: float) -> Tensor:
    """∂L/∂z_s of `WeightedKL` times `scale`·grad."""
    return _log_softmax_backward(p_t.sum(0) * (grad * scale), log_p_s)


class WeightedKL(torch.autograd.Function):
    """L = f·Σ_k Σ_i Σ_c w_ik·p_t,kic·(log p_t,kic − log p_s,ic), p = softmax(z/τ); w = 1 when None.

    student [B,C], teachers [K,B,C] (frozen), weights [K,B] (frozen) or None, τ, f → scalar.
    ∂L/∂z_s = (f/τ)·(W_i·p_s − Σ_k w_ik·p_t,k) with W_i = Σ_k w_ik: log_softmax's backward applied to
    −(f/τ)·Σ_k w·p_t forms W_i·p_s itself (Σ_c p_t = 1), so the gradient is 4 ops whatever K.
    """

    @staticmethod
    def forward(
        ctx, student: Tensor, teacher: Tensor, weights: Tensor | None, temperature: float, factor: float
    ):
        t = float(temperature)
        log_p_s, p_t, kd = _weighted_kl(student, teacher, weights, t, factor)
        ctx.save_for_backward(log_p_s, p_t)
        ctx.scale = -float(factor) / t
        return kd

    @staticmethod
    def backward(ctx, grad: Tensor):
        log_p_s, p_t = ctx.saved_tensors
        return _weighted_kl_grad(log_p_s, p_t, grad, ctx.scale), None, None, None, None


class CrossEntropyAndKL(torch.autograd.Function):
    """The logit terms of a distillation step: L = γ·CE(z_s, y) + α·KD, KD = `WeightedKL`'s L.

    student [B,C], labels [B], teachers [K,B,C] (frozen), weights [K,B] (frozen) or None, τ, f, γ, α →
    (L, CE, KD) (CE and KD reported, without gradient). ∂L/∂z_s = γ·(softmax(z_s) − onehot(y))/B (nll_loss's and
    log_softmax's backward, one op each) + α·∂KD/∂z_s (`WeightedKL`): 7 ops whatever K.
    """

    @staticmethod
    def forward(ctx, student, labels, teacher, weights, temperature: float, factor: float, gamma, alpha):
        t = float(temperature)
        log_p = F.log_softmax(_float(student), dim=-1)
        ce, total_weight = torch.ops.aten.nll_loss_forward(log_p, labels, None, _MEAN, _IGNORE)
        log_p_s, p_t, kd = _weighted_kl(student, teacher, weights, t, factor)
        ctx.save_for_backward(log_p, labels, total_weight, log_p_s, p_t)
        ctx.gamma, ctx.scale = float(gamma), -float(alpha) * float(factor) / t
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(ce, kd)
        loss = torch.add(ce if gamma == 1 else ce * gamma, kd, alpha=alpha)
        return loss, ce, kd

    @staticmethod
    def backward(ctx, grad: Tensor | None, _ce, _kd):
        if grad is None:
            return (None,) * 8
        log_p, labels, total_weight, log_p_s, p_t = ctx.saved_tensors
        g = grad if ctx.gamma == 1 else grad * ctx.gamma
        grad_log_p = torch.ops.aten.nll_loss_backward(g, log_p, labels, None, _MEAN, _IGNORE, total_weight)
        student = _log_softmax_backward(grad_log_p, log_p).add_(
            _weighted_kl_grad(log_p_s, p_t, grad, ctx.scale)
        )
        return student, None, None, None, None, None, None, None


class HeadsAndMSE(torch.autograd.Function):
    """A group's connector ReLU, its K frozen pool+fc heads and its feature MSEs, in one op each.

    x [B,K·C,H,W] (the connectors' map before their ReLU; channel block k: teacher k's), target [B,K,C,H,W]
    (frozen teacher maps, any float dtype), weight [K,C,N], bias [K,1,N] (frozen) → head logits h [K,B,N] and
    mse [K,B], with e = relu(x) viewed [B,K,C,H,W]:
        h_kb = mean_hw(e_bk)·W_k + b_k,   mse_kb = mean_chw (e_bk − t_bk)²   (float32).
    ∂/∂e_bk = (2/CHW)·∂L/∂mse_kb·(e_bk − t_bk) + (1/HW)·(∂L/∂h_kb·W_kᵀ) broadcast over H,W, then ∂/∂x = ∂/∂e
    where e > 0: 11 ops whatever K.
    """

    @staticmethod
    def forward(ctx, x: Tensor, target: Tensor, weight: Tensor, bias: Tensor):
        b, k, c, h, w = target.shape
        connected = F.relu(x)
        e = connected.view(b, k, c, h, w)
        diff = _float(e) - target  # [B,K,C,H,W], contiguous as `x`
        mse = diff.square().mean((2, 3, 4))  # [B,K]
        logits = torch.baddbmm(bias, e.mean((3, 4)).transpose(0, 1), weight)  # [K,B,N]
        ctx.save_for_backward(diff, weight, connected)
        ctx.set_materialize_grads(False)
        ctx.dtype = x.dtype
        return logits, mse.t()

    @staticmethod
    def backward(ctx, grad_logits: Tensor | None, grad_mse: Tensor | None):
        diff, weight, connected = ctx.saved_tensors
        b, k, c, h, w = diff.shape
        if grad_mse is None:
            grad = torch.zeros_like(diff)
        else:  # diff first: the result keeps its [B,K,C,H,W] layout
            grad = diff * (grad_mse.t() * (2.0 / (c * h * w))).view(b, k, 1, 1, 1)
        if grad_logits is not None:
            pooled = torch.bmm(grad_logits.to(weight.dtype), weight.transpose(1, 2))  # [K,B,C]
            grad.add_(pooled.transpose(0, 1).view(b, k, c, 1, 1), alpha=1.0 / (h * w))
        grad = torch.ops.aten.threshold_backward(grad.view(b, k * c, h, w).to(ctx.dtype), connected, 0)
        return grad, None, None, None


class ConfidenceWeightedMSE(torch.autograd.Function):
    """CA-MKD's intermediate term L = s·Σ_k Σ_i u_ik·mse_ik, s = 1/(B·K) or 1/B, and its weights u [K,B].

    mse [K,B], head_logits [K,B,N], labels [B], weights [K,B] (frozen) or None: then
        u_ik = (1 − softmax_k(ce_ik))/(K − 1),   ce_ik = CE(head_logits_ik, y_i),
    differentiable in head_logits when `head_gradient` (the authors' code), else not. With `teacher_logits`
    [K,B,N] (frozen) the teachers' own confidence weights w [K,B] (the KD term's) come from the same ops, the two
    sets stacked [2,K,B]. → (L, u, w or None) (u and w: no gradient).
    ∂L/∂mse = s·u; ∂L/∂ce = softmax's backward of −s·mse/(K−1); ∂L/∂head_logits = nll_loss's and log_softmax's
    backward of it (on the stacked sets when w is computed too: the teachers' half is discarded): ≤ 10 ops
    whatever K.
    """

    @staticmethod
    def forward(ctx, mse, head_logits, labels, weights, teacher_logits, head_gradient: bool, scale: float):
        ctx.set_materialize_grads(False)
        ctx.head_gradient = head_gradient and weights is None
        saved: tuple[Tensor, ...] = ()
        teacher_weights = None
        if weights is None:
            k, b, n = head_logits.shape
            logits = _float(head_logits)
            j = 1 if teacher_logits is None else 2
            if j == 2:  # heads first, then the teachers: [2K,B,N]
                logits = torch.cat([logits, _float(teacher_logits)])
            target = labels.repeat(j * k)
            log_p = F.log_softmax(logits.view(j * k * b, n), dim=-1)
            ce, total_weight = torch.ops.aten.nll_loss_forward(log_p, target, None, _NONE, _IGNORE)
            soft = F.softmax(ce.view(k, b) if j == 1 else ce.view(j, k, b), dim=j - 1)
            weights = torch.rsub(soft, 1.0 / (k - 1), alpha=1.0 / (k - 1))  # (1 − s)/(K − 1)
            if j == 2:
                weights, teacher_weights = weights.unbind(0)
            saved = (mse, soft, log_p, target, total_weight)
            ctx.factor, ctx.shape, ctx.dtype = -float(scale) / (k - 1), (j, k, b, n), head_logits.dtype
        scaled = weights * scale  # s·u: the loss's factor and ∂L/∂mse's, one op for both
        ctx.save_for_backward(scaled, *(saved if ctx.head_gradient else ()))
        ctx.mark_non_differentiable(*(w for w in (weights, teacher_weights) if w is not None))
        return (scaled * mse).sum(), weights, teacher_weights

    @staticmethod
    def backward(ctx, grad: Tensor | None, *_):
        none = (None,) * 5
        if grad is None:
            return None, None, *none
        scaled = ctx.saved_tensors[0]
        grad_mse = scaled * grad
        if not ctx.head_gradient or not ctx.needs_input_grad[1]:
            return grad_mse, None, *none
        _, mse, soft, log_p, target, total_weight = ctx.saved_tensors
        j, k, b, n = ctx.shape
        if j == 2:  # the teachers' half of the stacked sets gets the heads' values too, and is discarded
            mse = mse.expand(2, k, b)
        grad_soft = mse * (grad * ctx.factor)  # ∂L/∂softmax_k(ce) = −s·g·mse/(K − 1)
        grad_ce = torch.ops.aten._softmax_backward_data(grad_soft, soft, j - 1, soft.dtype)
        grad_log_p = torch.ops.aten.nll_loss_backward(
            grad_ce.view(j * k * b), log_p, target, None, _NONE, _IGNORE, total_weight
        )
        grad_logits = _log_softmax_backward(grad_log_p, log_p)
        if j == 2:
            grad_logits = grad_logits[: k * b]
        return grad_mse, grad_logits.view(k, b, n).to(ctx.dtype), *none
