"""The functional losses against references written from the formulas in docs/architecture.md (official-code semantics)."""

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from camkd import losses

torch.set_default_dtype(torch.float32)


# ---------------------------------------------------------------- references (loops, float64, official structure)
def ref_confidence_weights(teacher_logits, labels):
    ce = torch.stack([F.cross_entropy(t, labels, reduction="none") for t in teacher_logits])
    return (1.0 - F.softmax(ce, dim=0)) / (len(teacher_logits) - 1)


def ref_kl(student, teacher, temperature):
    log_p_s = F.log_softmax(student / temperature, dim=1)
    p_t = F.softmax(teacher / temperature, dim=1)
    return (F.kl_div(log_p_s, p_t, reduction="none") * temperature**2).sum(-1)


def ref_camkd_kd(student, teachers, labels, temperature):
    w = ref_confidence_weights(teachers, labels)
    kl = torch.stack([ref_kl(student, t, temperature) for t in teachers])
    return (w * kl).sum() / (student.shape[0] * len(teachers))


def ref_camkd_feat(connected, teacher_feats, head_logits, labels):
    b = labels.shape[0]
    u = ref_confidence_weights(head_logits, labels)
    mse = torch.stack(
        [F.mse_loss(s, t, reduction="none").reshape(b, -1).mean(-1) for s, t in zip(connected, teacher_feats)]
    )
    return (u * mse).sum() / (b * len(teacher_feats))


def ref_ebkd(student, teachers, temperature):
    entropies = []
    for t in teachers:
        p = F.softmax(t, dim=1)
        entropies.append((-p * torch.log(p)).sum(1))
    total = torch.stack(entropies).sum(0)
    w = torch.stack([1.0 - e / total for e in entropies])
    kl = torch.stack([ref_kl(student, t, temperature) for t in teachers])
    return (w * kl).sum() / (student.shape[0] * len(teachers))


def ref_dkd(student, teacher, labels, temperature, alpha, beta):
    # mdistiller's dkd_loss, written out.
    gt = F.one_hot(labels, student.shape[1]).double()
    other = 1 - gt
    p_s = F.softmax(student / temperature, dim=1)
    p_t = F.softmax(teacher / temperature, dim=1)
    cat = lambda p: torch.cat([(p * gt).sum(1, keepdim=True), (p * other).sum(1, keepdim=True)], 1)
    tckd = F.kl_div(torch.log(cat(p_s)), cat(p_t), reduction="sum") * temperature**2 / student.shape[0]
    p_t2 = F.softmax(teacher / temperature - 1000.0 * gt, dim=1)
    log_p_s2 = F.log_softmax(student / temperature - 1000.0 * gt, dim=1)
    nckd = F.kl_div(log_p_s2, p_t2, reduction="sum") * temperature**2 / student.shape[0]
    return alpha * tckd + beta * nckd


def random_problem(k=3, b=8, c=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(b, c, generator=g, dtype=torch.float64) * 2
    teachers = torch.randn(k, b, c, generator=g, dtype=torch.float64) * 3
    labels = torch.randint(0, c, (b,), generator=g)
    return student, teachers, labels


# ---------------------------------------------------------------- hand-computed example (K=2, B=2, C=2, τ=1)
LN3 = math.log(3.0)
HAND_TEACHERS = torch.tensor([[[0.0, 0.0], [0.0, 0.0]], [[LN3, 0.0], [LN3, 0.0]]], dtype=torch.float64)
HAND_LABELS = torch.tensor([0, 1])
HAND_STUDENT = torch.zeros(2, 2, dtype=torch.float64)
KAPPA = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)  # KL((3/4,1/4) ‖ (1/2,1/2))


def test_hand_computed_confidence_weights():
    # sample 0 (label 0): CE = (ln 2, ln 4/3) → softmax (0.6, 0.4) → w = (0.4, 0.6)
    # sample 1 (label 1): CE = (ln 2, ln 4)   → softmax (1/3, 2/3) → w = (2/3, 1/3)
    w = losses.confidence_weights(HAND_TEACHERS, HAND_LABELS)
    expected = torch.tensor([[0.4, 2 / 3], [0.6, 1 / 3]], dtype=torch.float64)
    torch.testing.assert_close(w.double(), expected, atol=1e-6, rtol=0)


def test_hand_computed_camkd_kd_loss():
    loss = losses.camkd_kd_loss(HAND_STUDENT, HAND_TEACHERS, HAND_LABELS, temperature=1.0)
    assert loss.item() == pytest.approx((0.6 * KAPPA + KAPPA / 3) / 4, abs=1e-6)
    mean = losses.camkd_kd_loss(HAND_STUDENT, HAND_TEACHERS, HAND_LABELS, temperature=1.0, normalize="mean")
    assert mean.item() == pytest.approx((0.6 * KAPPA + KAPPA / 3) / 2, abs=1e-6)


def test_hand_computed_camkd_feature_loss():
    connected = [torch.tensor([1.0, 2.0]).view(2, 1, 1, 1), torch.tensor([0.0, 1.0]).view(2, 1, 1, 1)]
    teacher = [torch.zeros(2, 1, 1, 1), torch.ones(2, 1, 1, 1)]
    # mse: teacher 1 → (1, 4), teacher 2 → (1, 0); u = w of the hand example.
    loss = losses.camkd_feature_loss(connected, teacher, HAND_TEACHERS.float(), HAND_LABELS)
    assert loss.item() == pytest.approx((0.4 * 1 + 2 / 3 * 4 + 0.6 * 1 + 1 / 3 * 0) / 4, abs=1e-6)


# ---------------------------------------------------------------- random inputs: values and gradients to 1e-5
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_camkd_kd_loss_matches_reference_value_and_grad(seed, temperature):
    student, teachers, labels = random_problem(seed=seed)
    s1 = student.clone().float().requires_grad_()
    s2 = student.clone().requires_grad_()
    ours = losses.camkd_kd_loss(s1, teachers.float(), labels, temperature)
    ref = ref_camkd_kd(s2, teachers, labels, temperature)
    ours.backward()
    ref.backward()
    assert ours.item() == pytest.approx(ref.item(), abs=1e-5, rel=1e-5)
    torch.testing.assert_close(s1.grad.double(), s2.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("seed", [0, 1])
def test_camkd_feature_loss_matches_reference_and_is_not_detached(seed):
    g = torch.Generator().manual_seed(seed)
    b, c = 6, 5
    shapes = [(4, 3, 3), (8, 2, 2)]  # teachers may differ in feature shape
    labels = torch.randint(0, c, (b,), generator=g)
    conn = [torch.randn(b, *s, generator=g, dtype=torch.float64) for s in shapes]
    teach = [torch.randn(b, *s, generator=g, dtype=torch.float64) for s in shapes]
    heads = torch.randn(2, b, c, generator=g, dtype=torch.float64)
    ours_in = [x.clone().float().requires_grad_() for x in conn]
    ours_heads = heads.clone().float().requires_grad_()
    ref_in = [x.clone().requires_grad_() for x in conn]
    ref_heads = heads.clone().requires_grad_()
    ours = losses.camkd_feature_loss(ours_in, [t.float() for t in teach], ours_heads, labels)
    ref = ref_camkd_feat(ref_in, teach, ref_heads, labels)
    ours.backward()
    ref.backward()
    assert ours.item() == pytest.approx(ref.item(), abs=1e-5, rel=1e-5)
    for a, r in zip(ours_in, ref_in):
        torch.testing.assert_close(a.grad.double(), r.grad, atol=1e-5, rtol=1e-5)
    # u is not detached: the head logits receive gradient, as in the official code.
    assert ours_heads.grad.abs().sum() > 0
    torch.testing.assert_close(ours_heads.grad.double(), ref_heads.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("seed", [0, 3])
def test_aver_ebkd_kd_match_reference(seed):
    student, teachers, labels = random_problem(seed=seed)
    for ours_fn, ref_fn in [
        (
            lambda s: losses.aver_kd_loss(s, teachers.float(), 4.0),
            lambda s: torch.stack(
                [
                    F.kl_div(F.log_softmax(s / 4, 1), F.softmax(t / 4, 1), reduction="batchmean") * 16
                    for t in teachers
                ]
            ).mean(),
        ),
        (
            lambda s: losses.ebkd_kd_loss(s, teachers.float(), labels, 4.0),
            lambda s: ref_ebkd(s, teachers, 4.0),
        ),
        (
            lambda s: losses.kd_loss(s, teachers[0].float(), 4.0),
            lambda s: (
                F.kl_div(F.log_softmax(s / 4, 1), F.softmax(teachers[0] / 4, 1), reduction="batchmean") * 16
            ),
        ),
    ]:
        s1, s2 = student.clone().float().requires_grad_(), student.clone().requires_grad_()
        ours, ref = ours_fn(s1), ref_fn(s2)
        ours.backward()
        ref.backward()
        assert ours.item() == pytest.approx(ref.item(), abs=1e-5, rel=1e-5)
        torch.testing.assert_close(s1.grad.double(), s2.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("seed", [0, 4])
def test_dkd_matches_reference(seed):
    student, teachers, labels = random_problem(seed=seed)
    s1, s2 = student.clone().float().requires_grad_(), student.clone().requires_grad_()
    ours = losses.dkd_loss(s1, teachers.float(), labels, 4.0, 1.0, 8.0)
    ref = torch.stack([ref_dkd(s2, t, labels, 4.0, 1.0, 8.0) for t in teachers]).mean()
    ours.backward()
    ref.backward()
    assert ours.item() == pytest.approx(ref.item(), abs=1e-5, rel=1e-5)
    torch.testing.assert_close(s1.grad.double(), s2.grad, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- the closed-form backward passes (camkd.closed_form)
def _f64(*shape, g, scale=1.0, grad=False):
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).requires_grad_(grad)


@pytest.mark.parametrize("weighted", [False, True])
def test_closed_form_logit_terms_pass_gradcheck(weighted):
    """WeightedKL and CrossEntropyAndKL: their hand-written ∂L/∂z_s against finite differences in float64."""
    from camkd import closed_form

    g = torch.Generator().manual_seed(0)
    student, teachers = _f64(4, 5, g=g, scale=2, grad=True), _f64(3, 4, 5, g=g, scale=3)
    weights = torch.rand(3, 4, generator=g, dtype=torch.float64) if weighted else None
    labels = torch.randint(0, 5, (4,), generator=g)
    kl = closed_form.WeightedKL.apply
    both = closed_form.CrossEntropyAndKL.apply
    assert torch.autograd.gradcheck(lambda z: kl(z, teachers, weights, 4.0, 0.7), (student,))
    for gamma, alpha in [(1.0, 1.0), (0.4, 2.5)]:
        args = (labels, teachers, weights, 2.0, 0.7, gamma, alpha)
        assert torch.autograd.gradcheck(lambda z, a=args: both(z, *a)[0], (student,))


@pytest.mark.parametrize("k", [1, 3])
def test_closed_form_heads_and_mse_pass_gradcheck(k):
    """HeadsAndMSE (connector ReLU, K pool+fc heads, K feature MSEs): ∂/∂x of both outputs in float64."""
    from camkd import closed_form

    g = torch.Generator().manual_seed(1)
    b, c, h, w, n = 2, 3, 2, 3, 4
    x = _f64(b, k * c, h, w, g=g, grad=True)
    target, weight, bias = _f64(b, k, c, h, w, g=g), _f64(k, c, n, g=g), _f64(k, 1, n, g=g)
    assert torch.autograd.gradcheck(lambda v: closed_form.HeadsAndMSE.apply(v, target, weight, bias), (x,))


@pytest.mark.parametrize("variant", ["official", "detached", "given", "with_teachers"])
def test_closed_form_confidence_weighted_mse_passes_gradcheck(variant):
    """ConfidenceWeightedMSE: ∂L/∂mse and (official) ∂L/∂head_logits through the confidence weights, in float64;
    with the teachers' weights computed in the same ops, or with given weights."""
    from camkd import closed_form

    g = torch.Generator().manual_seed(2)
    k, b, n = 3, 4, 5
    mse = torch.rand(k, b, generator=g, dtype=torch.float64).requires_grad_()
    heads = _f64(k, b, n, g=g, scale=2, grad=True)
    labels = torch.randint(0, n, (b,), generator=g)
    given = torch.rand(k, b, generator=g, dtype=torch.float64) if variant == "given" else None
    teachers = _f64(k, b, n, g=g, scale=3) if variant == "with_teachers" else None
    official = variant != "detached"

    def loss(m, hl):
        return closed_form.ConfidenceWeightedMSE.apply(m, hl, labels, given, teachers, official, 0.3)[0]

    if official and given is None:
        assert torch.autograd.gradcheck(loss, (mse, heads))
    else:  # the weights are constants of the gradient (detached or given): ∂L/∂mse only
        assert torch.autograd.gradcheck(lambda m: loss(m, heads.detach()), (mse,))


@pytest.mark.parametrize("mode", ["official", "detached", "with_teachers"])
def test_closed_form_terms_equal_autograd_for_1_to_8_teachers(mode):
    """ce_and_weighted_kl and confidence_weighted_mse (closed-form backward) against the same formulas through
    autograd, K = 1..8 (2..8 where confidence weights need two): values, weights and gradients to 1e-6."""
    for k in range(1, 9):
        g = torch.Generator().manual_seed(k)
        b, n = 6, 7
        student, teachers = torch.randn(b, n, generator=g) * 2, torch.randn(k, b, n, generator=g) * 3
        labels = torch.randint(0, n, (b,), generator=g)
        weights = torch.rand(k, b, generator=g) if k % 2 else None
        s1, s2, t2 = student.clone().requires_grad_(), student.clone().requires_grad_(), teachers.clone()
        ours = losses.ce_and_weighted_kl(s1, labels, teachers, weights, 4.0, "official", 0.5, 2.0)
        ref = losses.ce_and_weighted_kl(s2, labels, t2.requires_grad_(), weights, 4.0, "official", 0.5, 2.0)
        for a, r in zip(ours, ref):
            torch.testing.assert_close(a, r, atol=1e-6, rtol=1e-6)
        ours[0].backward()
        ref[0].backward()
        torch.testing.assert_close(s1.grad, s2.grad, atol=1e-6, rtol=1e-6)
        if k >= 2:
            _check_confidence_weighted_mse(k, b, n, g, mode, labels, teachers)


def _check_confidence_weighted_mse(k, b, n, g, mode, labels, teachers):
    mse, heads = torch.rand(k, b, generator=g), torch.randn(k, b, n, generator=g) * 2
    m1, h1 = mse.clone().requires_grad_(), heads.clone().requires_grad_()
    m2, h2 = mse.clone().requires_grad_(), heads.clone().requires_grad_()
    with_teachers = teachers if mode == "with_teachers" else None
    inter, u, w = losses.confidence_weighted_mse(
        m1, h1, labels, "mean", None, mode != "detached", with_teachers
    )
    ref_u = losses.confidence_weights(h2.detach() if mode == "detached" else h2, labels)
    ref = (ref_u * m2).sum() / b
    torch.testing.assert_close(inter, ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(u, ref_u.detach(), atol=1e-6, rtol=1e-6)
    if mode == "with_teachers":
        torch.testing.assert_close(w, losses.confidence_weights(teachers, labels), atol=1e-6, rtol=1e-6)
    inter.backward()
    ref.backward()
    torch.testing.assert_close(m1.grad, m2.grad, atol=1e-6, rtol=1e-6)
    if mode == "detached":
        assert h1.grad is None
    else:
        torch.testing.assert_close(h1.grad, h2.grad, atol=1e-6, rtol=1e-6)


def test_confidence_weights_properties():
    g = torch.Generator().manual_seed(0)
    b, c = 32, 10
    labels = torch.randint(0, c, (b,), generator=g)
    right = F.one_hot(labels, c).float() * 6
    noisy = torch.randn(b, c, generator=g) * 0.5  # uncertain, not confidently wrong
    wrong = F.one_hot((labels + 1) % c, c).float() * 6
    w = losses.confidence_weights(torch.stack([right, noisy, wrong]), labels)
    torch.testing.assert_close(w.sum(0), torch.ones(b))
    assert bool((w[2] < w[0]).all() and (w[2] < w[1]).all()), (
        "the deliberately wrong teacher must weigh least"
    )
    assert w.requires_grad is False


def test_a_confidently_wrong_teacher_loses_weight_on_its_swapped_classes_only_with_labels():
    """The quickstart's `swapped` teacher in miniature: two teachers right everywhere (moderately sure), one
    confidently right on classes 2-9 and confidently wrong on 0 and 1 (their labels exchanged). CA-MKD's
    label-aware weight for it falls on exactly classes 0 and 1; EBKD's label-free weight rises there, since it is
    sure of itself."""
    g = torch.Generator().manual_seed(0)
    b, c = 400, 10
    labels = torch.arange(b) % c
    good = [F.one_hot(labels, c).float() * 3 + torch.randn(b, c, generator=g) * 0.3 for _ in range(2)]
    swap = torch.tensor([1, 0, 2, 3, 4, 5, 6, 7, 8, 9])[labels]
    wrong = F.one_hot(swap, c).float() * 8 + torch.randn(b, c, generator=g) * 0.3
    teachers = torch.stack([*good, wrong])
    camkd_w = losses.confidence_weights(teachers, labels)[2]
    ebkd_w = losses.entropy_weights(teachers)[2]
    on = labels < 2
    assert camkd_w[on].mean() < 0.5 * camkd_w[~on].mean(), (camkd_w[on].mean(), camkd_w[~on].mean())
    assert ebkd_w[on].mean() >= ebkd_w[~on].mean() * 0.99, (ebkd_w[on].mean(), ebkd_w[~on].mean())


def test_one_teacher_is_a_clear_error():
    with pytest.raises(ValueError, match=r"at least 2 teachers.*K=1.*'kd'"):
        losses.confidence_weights(torch.randn(1, 4, 3), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="at least 2 teachers"):
        losses.camkd_kd_loss(torch.randn(4, 3), torch.randn(1, 4, 3), torch.zeros(4, dtype=torch.long))


def test_mismatched_shapes_name_both_shapes():
    with pytest.raises(ValueError, match=r"student_logits \[4,3\].*teacher_logits \[2,4,5\]"):
        losses.camkd_kd_loss(torch.randn(4, 3), torch.randn(2, 4, 5), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[4,3\].*\[4,5\]"):
        losses.kd_loss(torch.randn(4, 3), torch.randn(4, 5))
    with pytest.raises(
        ValueError, match=r"connected student feature \[2,4,2,2\].*teacher feature \[2,4,3,3\]"
    ):
        losses.camkd_feature_loss(
            [torch.randn(2, 4, 2, 2)] * 2,
            [torch.randn(2, 4, 3, 3)] * 2,
            torch.randn(2, 2, 3),
            torch.zeros(2).long(),
        )
    with pytest.raises(ValueError, match=r"labels must be \[B\] with B=4.*labels \[3\]"):
        losses.confidence_weights(torch.randn(2, 4, 3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="normalize must be"):
        losses.camkd_kd_loss(torch.randn(4, 3), torch.randn(2, 4, 3), torch.zeros(4).long(), normalize="sum")


def test_camkd_package_imports_no_ray():
    root = Path(__file__).resolve().parents[1]
    code = (
        "import sys, camkd, camkd.models, camkd.losses, camkd.strategies, camkd.connectors, camkd.metrics\n"
        "bad = sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.'))\n"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root)
    for path in (root / "camkd").rglob("*.py"):
        text = path.read_text()
        assert "import ray" not in text and "from ray" not in text, f"{path} imports Ray; camkd/ must not"
