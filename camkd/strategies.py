"""Distillation strategies: one small class per method behind one interface (as mdistiller's distillers).

A strategy turns the student's logits/feature map and a batch's teacher outputs into the total loss and a dict of
named terms. It declares which teacher outputs it needs, so the pipeline reads nothing else. It owns the trainable
connectors and the frozen teacher heads. It never loads data, runs teachers or imports Ray.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from camkd import losses
from camkd.connectors import build_connectors

FeatureWeights = Literal["official", "detached", "logit"]


def _about(doc: str, **bounds: float) -> dict:
    """A hyper-parameter's description and bounds (`gt`, `ge`): the configuration's schema is built from these
    (`pipeline/config/schema.py`), so each parameter is defined once, here."""
    return {"doc": doc, **bounds}


@dataclass(frozen=True)
class StrategyParams:
    """Loss hyper-parameters. L = gamma·CE + alpha·L_KD + beta·L_inter (docs/architecture.md, "The method", step 4)."""

    temperature: float = field(default=4.0, metadata=_about("softmax temperature τ of the KD terms", gt=0))
    gamma: float = field(default=1.0, metadata=_about("weight of the cross-entropy term", ge=0))
    alpha: float = field(default=1.0, metadata=_about("weight of the KD term", ge=0))
    beta: float = field(default=50.0, metadata=_about("weight of the intermediate (feature) term", ge=0))
    normalize: losses.Normalize = field(
        default="official",
        metadata=_about("official: Σ w·term / (B·K), as the authors' code; mean: the plain weighted mean"),
    )
    feature_weights: FeatureWeights = field(
        default="official",
        metadata=_about(
            "weights of the feature term: official = each teacher's frozen head on the connected student map "
            "(gradient flows through them, as upstream); detached = the same, without gradient; logit = the "
            "logit confidence weights"
        ),
    )
    inter_warmup_epochs: int = field(
        default=1, metadata=_about("epochs without the intermediate term (official: 1)", ge=0)
    )
    dkd_alpha: float = field(default=1.0, metadata=_about("DKD: weight of the target-class term", ge=0))
    dkd_beta: float = field(default=8.0, metadata=_about("DKD: weight of the non-target-class term", ge=0))
    dkd_warmup_epochs: int = field(
        default=20, metadata=_about("DKD: epochs over which its loss ramps up linearly", ge=1)
    )


@dataclass
class TeacherOutputs:
    """One batch of teacher knowledge, cached or computed online. K teachers, in the strategy's order."""

    logits: Tensor | None = None  # [K,B,C]
    features: Sequence[Tensor] | None = None  # K × [B,C_k,H_k,W_k]


@dataclass
class StrategyOutput:
    loss: Tensor  # scalar, differentiable
    terms: dict[str, Tensor]  # named detached scalars: loss, ce, kd, inter, weight/<teacher>, ...
    weights: Tensor | None = None  # [K,B] per-sample logit weights (detached), for per-class statistics


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


class Strategy(nn.Module):
    name: ClassVar[str]
    needs_logits: ClassVar[bool] = False
    needs_features: ClassVar[bool] = False
    min_teachers: ClassVar[int] = 1
    max_teachers: ClassVar[int | None] = None

    def __init__(self, teacher_names: Sequence[str] = (), params: StrategyParams | None = None) -> None:
        super().__init__()
        self.check_teachers(teacher_names)
        self.teacher_names = list(teacher_names)
        self.params = params or StrategyParams()

    @classmethod
    def check_teachers(cls, teacher_names: Sequence[str]) -> None:
        """Raise a ValueError saying what to do when this strategy cannot take these teachers."""
        k = len(teacher_names)
        if k < cls.min_teachers or (cls.max_teachers is not None and k > cls.max_teachers):
            allowed = (
                f"exactly {cls.min_teachers}"
                if cls.min_teachers == cls.max_teachers
                else f"at least {cls.min_teachers}"
                + ("" if cls.max_teachers is None else f" and at most {cls.max_teachers}")
            )
            hint = {
                "kd": "; use aver, ebkd, dkd or camkd for several teachers",
                "camkd": "; with one teacher use kd",
                "camkd_logits": "; with one teacher use kd",
                "ce": "; remove the teachers or pick a distillation strategy",
            }.get(cls.name, "")
            raise ValueError(f"strategy {cls.name!r} takes {allowed} teacher(s), got {k}{hint}")
        if len(set(teacher_names)) != k:
            raise ValueError(f"teacher names must be unique, got {list(teacher_names)}")

    def idle_parameters(self, epoch: int) -> Iterator[nn.Parameter]:
        """Parameters whose term is not in the loss at this epoch (their .grad should be cleared)."""
        return iter(())

    def forward(
        self,
        student_logits: Tensor,
        student_features: Tensor,
        labels: Tensor,
        teachers: TeacherOutputs,
        epoch: int,
    ) -> StrategyOutput:
        raise NotImplementedError

    # Helpers shared by the logit strategies.
    def _logits(self, teachers: TeacherOutputs, student_logits: Tensor) -> Tensor:
        if teachers.logits is None:
            raise ValueError(f"strategy {self.name!r} needs teacher logits, none were given")
        t = teachers.logits
        if t.dim() != 3 or t.shape[0] != len(self.teacher_names) or t.shape[1:] != student_logits.shape:
            raise ValueError(
                f"teacher logits [{','.join(map(str, t.shape))}] do not match "
                f"{len(self.teacher_names)} teachers and student logits [{','.join(map(str, student_logits.shape))}]"
            )
        return t.float()

    def _weight_terms(self, prefix: str, weights: Tensor) -> dict[str, Tensor]:
        means = weights.detach().float().mean(1)
        return {f"{prefix}/{name}": means[i] for i, name in enumerate(self.teacher_names)}


class CE(Strategy):
    """Cross-entropy only: the no-teacher baseline (also how teachers are trained)."""

    name = "ce"
    min_teachers = 0
    max_teachers = 0

    def forward(self, student_logits, student_features, labels, teachers, epoch):
        ce = F.cross_entropy(student_logits.float(), labels)
        return StrategyOutput(ce, {"loss": ce.detach(), "ce": ce.detach()})


class _LogitStrategy(Strategy):
    needs_logits = True

    def kd_term(self, student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, epoch: int):
        raise NotImplementedError

    def forward(self, student_logits, student_features, labels, teachers, epoch):
        p = self.params
        teacher_logits = self._logits(teachers, student_logits)
        ce = F.cross_entropy(student_logits.float(), labels)
        kd, weights = self.kd_term(student_logits, teacher_logits, labels, epoch)
        loss = p.gamma * ce + p.alpha * kd
        terms = {"loss": loss.detach(), "ce": ce.detach(), "kd": kd.detach()}
        terms.update(self._weight_terms("weight", weights))
        return StrategyOutput(loss, terms, weights.detach())


class KD(_LogitStrategy):
    """Hinton KD from one teacher: batchmean τ²·KL."""

    name = "kd"
    max_teachers = 1

    def kd_term(self, student_logits, teacher_logits, labels, epoch):
        kd = losses.kd_loss(student_logits, teacher_logits[0], self.params.temperature)
        return kd, torch.ones(1, student_logits.shape[0], device=student_logits.device)


class Aver(_LogitStrategy):
    """AVER: the mean of the per-teacher KD losses (equal weights)."""

    name = "aver"

    def kd_term(self, student_logits, teacher_logits, labels, epoch):
        kd = losses.aver_kd_loss(student_logits, teacher_logits, self.params.temperature)
        k, b = teacher_logits.shape[:2]
        return kd, torch.full((k, b), 1.0 / k, device=student_logits.device)


class EBKD(_LogitStrategy):
    """Entropy-based weights: a confident (low-entropy) teacher gets more weight; label-free."""

    name = "ebkd"

    def kd_term(self, student_logits, teacher_logits, labels, epoch):
        weights = losses.entropy_weights(teacher_logits)
        kd = losses.ebkd_kd_loss(
            student_logits, teacher_logits, labels, self.params.temperature, weights=weights
        )
        return kd, weights


class DKD(_LogitStrategy):
    """Decoupled KD (mean over teachers), ramped up linearly over `dkd_warmup_epochs` as in mdistiller."""

    name = "dkd"

    def kd_term(self, student_logits, teacher_logits, labels, epoch):
        p = self.params
        ramp = min((epoch + 1) / max(p.dkd_warmup_epochs, 1), 1.0)
        kd = ramp * losses.dkd_loss(
            student_logits, teacher_logits, labels, p.temperature, p.dkd_alpha, p.dkd_beta
        )
        k, b = teacher_logits.shape[:2]
        return kd, torch.full((k, b), 1.0 / k, device=student_logits.device)


class CAMKDLogits(_LogitStrategy):
    """CA-MKD without the intermediate term: confidence-weighted KD only."""

    name = "camkd_logits"
    min_teachers = 2

    def kd_term(self, student_logits, teacher_logits, labels, epoch):
        weights = losses.confidence_weights(teacher_logits, labels)
        kd = losses.camkd_kd_loss(
            student_logits,
            teacher_logits,
            labels,
            self.params.temperature,
            self.params.normalize,
            weights=weights,
        )
        return kd, weights


class CAMKD(CAMKDLogits):
    """Full CA-MKD: confidence-weighted KD plus the confidence-weighted intermediate (feature) term."""

    name = "camkd"
    needs_features = True

    def __init__(
        self,
        teacher_names: Sequence[str] = (),
        params: StrategyParams | None = None,
        *,
        student_channels: int | None = None,
        teacher_feature_shapes: Sequence[Sequence[int]] | None = None,
        teacher_heads: Sequence[nn.Module] | None = None,
    ) -> None:
        super().__init__(teacher_names, params)
        k = len(self.teacher_names)
        if student_channels is None or teacher_feature_shapes is None or teacher_heads is None:
            raise ValueError(
                "strategy 'camkd' needs student_channels, teacher_feature_shapes and teacher_heads"
            )
        if len(teacher_feature_shapes) != k or len(teacher_heads) != k:
            raise ValueError(
                f"strategy 'camkd' got {k} teachers but {len(teacher_feature_shapes)} feature shapes "
                f"and {len(teacher_heads)} heads"
            )
        self.connectors = build_connectors(student_channels, teacher_feature_shapes)
        self.heads = nn.ModuleList(FrozenHead(h) for h in teacher_heads)

    def idle_parameters(self, epoch: int) -> Iterator[nn.Parameter]:
        if epoch < self.params.inter_warmup_epochs:
            yield from self.connectors.parameters()

    def forward(self, student_logits, student_features, labels, teachers, epoch):
        out = super().forward(student_logits, student_features, labels, teachers, epoch)
        if teachers.features is None or len(teachers.features) != len(self.teacher_names):
            raise ValueError("strategy 'camkd' needs one feature map per teacher")
        connected = [c(student_features) for c in self.connectors]
        head_logits = torch.stack([h(e) for h, e in zip(self.heads, connected)])
        mode = self.params.feature_weights
        if mode == "official":
            feat_weights = losses.confidence_weights(head_logits, labels)
        elif mode == "detached":
            feat_weights = losses.confidence_weights(head_logits.detach(), labels)
        elif mode == "logit":
            feat_weights = out.weights
        else:
            raise ValueError(f"feature_weights must be 'official', 'detached' or 'logit', got {mode!r}")
        inter = losses.camkd_feature_loss(
            connected, teachers.features, head_logits, labels, self.params.normalize, weights=feat_weights
        )
        # Before the warm-up ends the term is computed (as the official code does) but not used: multiplying
        # by zero keeps every parameter in the autograd graph, which DistributedDataParallel requires.
        beta = self.params.beta if epoch >= self.params.inter_warmup_epochs else 0.0
        loss = out.loss + beta * inter
        out.terms.update(loss=loss.detach(), inter=inter.detach())
        out.terms.update(self._weight_terms("feat_weight", feat_weights))
        return StrategyOutput(loss, out.terms, out.weights)


STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls for cls in (CE, KD, Aver, EBKD, DKD, CAMKD, CAMKDLogits)
}


def strategy_class(name: str) -> type[Strategy]:
    try:
        return STRATEGIES[name]
    except KeyError:
        raise ValueError(f"unknown strategy {name!r}; choose one of {sorted(STRATEGIES)}") from None


def create_strategy(
    name: str,
    teacher_names: Sequence[str] = (),
    params: StrategyParams | None = None,
    **kwargs,
) -> Strategy:
    """Build a strategy by name. `camkd` also needs student_channels, teacher_feature_shapes, teacher_heads."""
    cls = strategy_class(name)
    if not cls.needs_features:
        kwargs = {}
    return cls(teacher_names, params, **kwargs)


class Distiller(nn.Module):
    """Student + strategy as one module, so DDP synchronises the student and the connectors together."""

    def __init__(self, student: nn.Module, strategy: Strategy) -> None:
        super().__init__()
        self.student = student
        self.strategy = strategy

    def forward(
        self, images: Tensor, labels: Tensor, teachers: TeacherOutputs, epoch: int
    ) -> tuple[Tensor, Tensor, dict[str, Tensor], Tensor | None]:
        features = self.student.forward_features(images)
        logits = self.student.forward_head(features)
        out = self.strategy(logits, features, labels, teachers, epoch)
        return out.loss, logits, out.terms, out.weights
