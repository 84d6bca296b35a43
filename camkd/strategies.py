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
from camkd.groups import TeacherGroups
from camkd.heads import FrozenHead  # noqa: F401  (its home before camkd.heads)

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

    def _output(
        self,
        loss: Tensor,
        scalars: dict[str, Tensor],
        weight_sets: Sequence[tuple[str, Tensor, Sequence[str]]] = (),
        weights: Tensor | None = None,
    ) -> StrategyOutput:
        """The output with its named terms: the scalars, then {prefix/teacher: mean weight} of each weight set,
        detached, from one stack, one mean per set, one cat and one unbind, whatever the number of teachers."""
        names = list(scalars)
        with torch.no_grad():
            parts = [torch.stack(list(scalars.values()))]
            for prefix, w, teacher_names in weight_sets:
                parts.append(w.float().mean(1))
                names += [f"{prefix}/{n}" for n in teacher_names]
            values = (torch.cat(parts) if len(parts) > 1 else parts[0]).unbind()
        return StrategyOutput(loss, dict(zip(names, values)), _detached(weights))


def _detached(t: Tensor | None) -> Tensor | None:
    return t.detach() if t is not None and t.requires_grad else t


def _times(factor: float | Tensor, term: Tensor) -> Tensor:
    """factor·term, with no op where the factor is the number 1."""
    return term if isinstance(factor, float | int) and factor == 1 else factor * term


def _from_epoch(epoch: int | Tensor, start: int, value: float) -> float | Tensor:
    """`value` from epoch `start` on, else 0. A tensor epoch (a compiled step) gives a tensor: one graph for
    every epoch."""
    if isinstance(epoch, Tensor):
        return (epoch >= start) * value
    return value if epoch >= start else 0.0


def _ramp(epoch: int | Tensor, epochs: int) -> float | Tensor:
    """min((epoch + 1) / epochs, 1): a linear warm-up (a tensor for a tensor epoch)."""
    epochs = max(epochs, 1)
    if isinstance(epoch, Tensor):
        return ((epoch + 1) / epochs).clamp(max=1.0)
    return min((epoch + 1) / epochs, 1.0)


class CE(Strategy):
    """Cross-entropy only: the no-teacher baseline (also how teachers are trained)."""

    name = "ce"
    min_teachers = 0
    max_teachers = 0

    def forward(self, student_logits, student_features, labels, teachers, epoch):
        ce = F.cross_entropy(student_logits.float(), labels)
        return self._output(ce, {"loss": ce, "ce": ce})


class _LogitStrategy(Strategy):
    needs_logits = True

    def kd_weights(
        self, teacher_logits: Tensor, labels: Tensor
    ) -> tuple[Tensor | None, Tensor, losses.Normalize]:
        """The KD term as a weighted KL (`losses.weighted_kl`): → (its weights [K,B], None for all 1; the
        per-sample teacher weights [K,B] reported; its normalisation)."""
        raise NotImplementedError

    def kd_term(self, student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, epoch):
        """→ (the KD term, scalar; per-sample teacher weights [K,B], for the reports). Only a strategy whose KD
        term is not a weighted KL defines it (and leaves `kd_weights` alone)."""
        raise NotImplementedError

    def logit_terms(
        self, student_logits, labels, teachers, epoch
    ) -> tuple[Tensor, dict[str, Tensor], Tensor]:
        """→ (γ·CE + α·KD, the named scalars, the teacher weights). A weighted-KL KD term and the CE are one
        `losses.ce_and_weighted_kl` (their gradient in a few ops, whatever the number of teachers)."""
        p = self.params
        teacher_logits = self._logits(teachers, student_logits)
        if type(self).kd_term is _LogitStrategy.kd_term:
            kl_weights, weights, normalize = self.kd_weights(teacher_logits, labels)
            loss, ce, kd = losses.ce_and_weighted_kl(
                student_logits, labels, teacher_logits, kl_weights, p.temperature, normalize, p.gamma, p.alpha
            )
        else:
            ce = F.cross_entropy(student_logits.float(), labels)
            kd, weights = self.kd_term(student_logits, teacher_logits, labels, epoch)
            loss = _times(p.gamma, ce) + _times(p.alpha, kd)
        return loss, {"loss": loss, "ce": ce, "kd": kd}, weights

    def forward(self, student_logits, student_features, labels, teachers, epoch):
        loss, scalars, weights = self.logit_terms(student_logits, labels, teachers, epoch)
        return self._output(loss, scalars, [("weight", weights, self.teacher_names)], weights)


class KD(_LogitStrategy):
    """Hinton KD from one teacher: batchmean τ²·KL (`losses.kd_loss`)."""

    name = "kd"
    max_teachers = 1

    def kd_weights(self, teacher_logits, labels):
        return None, torch.ones(1, teacher_logits.shape[1], device=teacher_logits.device), "official"


class Aver(_LogitStrategy):
    """AVER: the mean of the per-teacher KD losses (equal weights, `losses.aver_kd_loss`)."""

    name = "aver"

    def kd_weights(self, teacher_logits, labels):
        k, b = teacher_logits.shape[:2]
        return None, torch.full((k, b), 1.0 / k, device=teacher_logits.device), "official"


class EBKD(_LogitStrategy):
    """Entropy-based weights: a confident (low-entropy) teacher gets more weight; label-free
    (`losses.ebkd_kd_loss`)."""

    name = "ebkd"

    def kd_weights(self, teacher_logits, labels):
        weights = losses.entropy_weights(teacher_logits)
        return weights, weights, "official"


class DKD(_LogitStrategy):
    """Decoupled KD (mean over teachers), ramped up linearly over `dkd_warmup_epochs` as in mdistiller."""

    name = "dkd"

    def kd_term(self, student_logits, teacher_logits, labels, epoch):
        p = self.params
        kd = _times(
            _ramp(epoch, p.dkd_warmup_epochs),
            losses.dkd_loss(student_logits, teacher_logits, labels, p.temperature, p.dkd_alpha, p.dkd_beta),
        )
        k, b = teacher_logits.shape[:2]
        return kd, torch.full((k, b), 1.0 / k, device=student_logits.device)


class CAMKDLogits(_LogitStrategy):
    """CA-MKD without the intermediate term: confidence-weighted KD only (`losses.camkd_kd_loss`)."""

    name = "camkd_logits"
    min_teachers = 2

    def kd_weights(self, teacher_logits, labels):
        weights = losses.confidence_weights(teacher_logits, labels)
        return weights, weights, self.params.normalize


class CAMKD(CAMKDLogits):
    """Full CA-MKD: confidence-weighted KD plus the confidence-weighted intermediate (feature) term.

    Teachers of one feature shape are one group (`camkd.groups`): one stacked connector and their frozen heads
    as one batched op, so a teacher of an existing shape adds data, not ops."""

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
        self.teacher_groups = TeacherGroups(student_channels, teacher_feature_shapes, teacher_heads)
        self.register_load_state_dict_pre_hook(_convert_legacy_state)

    def idle_parameters(self, epoch: int) -> Iterator[nn.Parameter]:
        if epoch < self.params.inter_warmup_epochs:
            yield from (p for p in self.teacher_groups.parameters() if p.requires_grad)

    def feature_term(
        self, student_features, labels, teachers, teacher_logits
    ) -> tuple[Tensor, Tensor, Tensor]:
        """→ (L_inter, its per-sample weights [K,B] in group order, the KD term's confidence weights [K,B]); the
        two sets of confidence weights come from one `losses.confidence_weighted_mse`."""
        if teachers.features is None or len(teachers.features) != len(self.teacher_names):
            raise ValueError("strategy 'camkd' needs one feature map per teacher")
        groups, p = self.teacher_groups, self.params  # teachers of one feature shape stacked; group order
        head_logits, mse = groups(student_features, teachers.features)
        if p.feature_weights == "logit":
            weights = losses.confidence_weights(teacher_logits, labels)
            given = groups.in_group_order(weights)
            inter, feat_weights, _ = losses.confidence_weighted_mse(
                mse, head_logits, labels, p.normalize, given
            )
            return inter, feat_weights, weights
        if p.feature_weights not in ("official", "detached"):
            raise ValueError(
                f"feature_weights must be 'official', 'detached' or 'logit', got {p.feature_weights!r}"
            )
        return losses.confidence_weighted_mse(
            mse,
            head_logits,
            labels,
            p.normalize,
            head_gradient=p.feature_weights == "official",
            teacher_logits=teacher_logits,
        )

    def forward(self, student_logits, student_features, labels, teachers, epoch):
        p = self.params
        teacher_logits = self._logits(teachers, student_logits)
        inter, feat_weights, weights = self.feature_term(student_features, labels, teachers, teacher_logits)
        loss, ce, kd = losses.ce_and_weighted_kl(
            student_logits, labels, teacher_logits, weights, p.temperature, p.normalize, p.gamma, p.alpha
        )
        # Before the warm-up ends the term is computed (as the official code does) but not used: multiplying
        # by zero keeps every parameter in the autograd graph, which DistributedDataParallel requires.
        beta = _from_epoch(epoch, p.inter_warmup_epochs, p.beta)
        loss = loss + beta * inter if isinstance(beta, Tensor) else loss.add(inter, alpha=beta)
        scalars = {"loss": loss, "ce": ce, "kd": kd, "inter": inter}
        group_names = [self.teacher_names[i] for i in self.teacher_groups.order]
        sets = [("weight", weights, self.teacher_names), ("feat_weight", feat_weights, group_names)]
        return self._output(loss, scalars, sets, weights)


def _convert_legacy_state(module: CAMKD, state: dict, prefix: str, *_) -> None:
    """load_state_dict pre-hook: a per-teacher state of camkd <= 0.1 is converted (with a warning)."""
    module.teacher_groups.convert_legacy_state(state, prefix)


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
