"""Strategies: one interface, the right terms, the warm-up of the intermediate term, clear teacher-count errors."""

import pytest
import torch
import torch.nn.functional as F

from camkd import STRATEGIES, Distiller, StrategyParams, TeacherOutputs, create_strategy, losses, models


def _batch(k=3, b=6, c=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    student = models.create("resnet8", c, 3)
    teachers = [models.create(a, c, 3) for a in ("resnet8", "resnet14", "wrn_16_1")[:k]]
    x = torch.randn(b, 3, 32, 32, generator=g)
    y = torch.randint(0, c, (b,), generator=g)
    with torch.no_grad():
        fmaps = [t.forward_features(x) for t in teachers]
        logits = torch.stack([t.forward_head(f) for t, f in zip(teachers, fmaps)])
    return student, teachers, x, y, TeacherOutputs(logits, fmaps)


def _camkd(student, teachers, names, params=None):
    return create_strategy(
        "camkd",
        names,
        params,
        student_channels=student.feature_channels,
        teacher_feature_shapes=[[t.feature_channels, 8, 8] for t in teachers],
        teacher_heads=[t.head for t in teachers],
    )


def test_every_strategy_declares_its_inputs():
    assert {n: (c.needs_logits, c.needs_features) for n, c in STRATEGIES.items()} == {
        "ce": (False, False),
        "kd": (True, False),
        "aver": (True, False),
        "ebkd": (True, False),
        "dkd": (True, False),
        "camkd": (True, True),
        "camkd_logits": (True, False),
    }


@pytest.mark.parametrize("name", ["aver", "ebkd", "dkd", "camkd_logits"])
def test_logit_strategies_total_is_ce_plus_alpha_kd(name):
    student, teachers, x, y, out = _batch()
    strategy = create_strategy(name, ["a", "b", "c"], StrategyParams(alpha=0.7, gamma=0.5))
    s_logits = student(x)
    res = strategy(s_logits, student.forward_features(x), y, TeacherOutputs(out.logits), epoch=30)
    ce = F.cross_entropy(s_logits, y)
    assert res.loss.item() == pytest.approx(0.5 * ce.item() + 0.7 * res.terms["kd"].item(), rel=1e-5)
    assert set(res.terms) >= {"loss", "ce", "kd", "weight/a", "weight/b", "weight/c"}
    assert res.weights.shape == (3, 6)
    res.loss.backward()


def test_camkd_logits_matches_functional_loss():
    student, _, x, y, out = _batch()
    s_logits = student(x)
    res = create_strategy("camkd_logits", ["a", "b", "c"])(s_logits, None, y, out, epoch=0)
    expected = F.cross_entropy(s_logits, y) + losses.camkd_kd_loss(s_logits, out.logits, y, 4.0)
    assert res.loss.item() == pytest.approx(expected.item(), rel=1e-6)
    torch.testing.assert_close(res.weights, losses.confidence_weights(out.logits, y))


def test_camkd_intermediate_term_is_off_in_the_first_epoch_and_gradients_reach_connectors():
    student, teachers, x, y, out = _batch()
    strategy = _camkd(student, teachers, ["a", "b", "c"])
    distiller = Distiller(student, strategy)
    loss0, _, terms0, _ = distiller(x, y, out, 0)
    assert loss0.item() == pytest.approx(terms0["ce"].item() + terms0["kd"].item(), rel=1e-5)
    assert terms0["inter"].item() > 0
    assert list(strategy.idle_parameters(0)) and not list(strategy.idle_parameters(1))
    loss1, _, terms1, _ = distiller(x, y, out, 1)
    assert loss1.item() == pytest.approx(
        terms1["ce"].item() + terms1["kd"].item() + 50 * terms1["inter"].item(), rel=1e-5
    )
    loss1.backward()
    groups = strategy.teacher_groups.groups  # the three teachers' maps are all [64,8,8]: one stacked group
    assert [g.members for g in groups] == [(0, 1, 2)]
    conn = groups[0].connector.conv.weight
    assert conn.grad is not None and conn.grad.abs().sum() > 0
    # teacher heads are frozen and stay out of training
    assert all(not p.requires_grad for g in groups for p in g.heads.parameters())
    distiller.train()
    assert all(not m.training for g in groups for m in g.heads.modules() if hasattr(m, "head"))
    assert {f"feat_weight/{n}" for n in "abc"} <= set(terms1)


def test_camkd_rejects_one_teacher_and_kd_rejects_three():
    student, teachers, *_ = _batch(k=1)
    with pytest.raises(ValueError, match="'camkd' takes at least 2 teacher.*got 1.*use kd"):
        _camkd(student, teachers, ["a"])
    with pytest.raises(ValueError, match="'kd' takes exactly 1 teacher.*got 3"):
        create_strategy("kd", ["a", "b", "c"])
    with pytest.raises(ValueError, match="'ce' takes exactly 0"):
        create_strategy("ce", ["a"])
    with pytest.raises(ValueError, match="unknown strategy 'camdk'"):
        create_strategy("camdk", ["a", "b"])


def test_teacher_logits_shape_mismatch_is_named():
    student, _, x, y, out = _batch()
    strategy = create_strategy("aver", ["a", "b"])
    with pytest.raises(ValueError, match=r"teacher logits \[3,6,10\] do not match 2 teachers"):
        strategy(student(x), None, y, out, 0)
