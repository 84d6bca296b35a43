"""What a training step costs a launch-bound GPU, counted on CPU. Stacked teachers: CA-MKD's connectors, frozen heads, confidence weights and feature MSEs of teachers that share a
feature shape run as one group, with the same math as one module per teacher (camkd <= 0.1, kept here as the
reference), and a step's op count no longer grows by a connector, a head and a loss per teacher."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from camkd import Distiller, StrategyParams, TeacherOutputs, create_strategy, losses, models
from camkd.groups import TeacherGroups
from camkd.models.base import GlobalPoolHead


# ------------------------------------------------------------- the per-teacher code of camkd <= 0.1 (reference)
class RefConnector(nn.Module):
    def __init__(self, student_channels, teacher_shape):
        super().__init__()
        channels, self.height, self.width = teacher_shape
        self.transfer = nn.Sequential(
            nn.Conv2d(student_channels, channels, kernel_size=1, bias=True),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
        )

    def forward(self, x):
        h, w = x.shape[-2:]
        if (h, w) != (self.height, self.width):
            if h >= self.height:
                x = F.adaptive_avg_pool2d(x, (self.height, self.width))
            else:
                x = F.interpolate(x, size=(self.height, self.width), mode="bilinear")
        return self.transfer(x)


class RefHead(nn.Module):
    def __init__(self, head):
        super().__init__()
        self.head = head.eval()
        for p in self.head.parameters():
            p.requires_grad_(False)

    def train(self, mode=True):
        return super().train(False)

    def forward(self, x):
        return self.head(x)


class Legacy(nn.Module):
    """What CAMKD held per teacher: its state dict has the keys of a camkd <= 0.1 checkpoint."""

    def __init__(self, student_channels, shapes, heads):
        super().__init__()
        self.connectors = nn.ModuleList(RefConnector(student_channels, s) for s in shapes)
        self.heads = nn.ModuleList(RefHead(h) for h in heads)

    def feature_term(self, student_features, teacher_feats, labels, mode, logit_weights, normalize):
        connected = [c(student_features) for c in self.connectors]
        head_logits = torch.stack([h(e) for h, e in zip(self.heads, connected)])
        if mode == "official":
            w = losses.confidence_weights(head_logits, labels)
        elif mode == "detached":
            w = losses.confidence_weights(head_logits.detach(), labels)
        else:
            w = logit_weights
        b = head_logits.shape[1]
        mse = [
            (s.float() - t.float()).pow(2).reshape(b, -1).mean(-1) for s, t in zip(connected, teacher_feats)
        ]
        weighted = w * torch.stack(mse)
        k = weighted.shape[0]
        inter = weighted.sum() / (b * k) if normalize == "official" else weighted.sum() / b
        return inter, w, head_logits


# ----------------------------------------------------------------------------------------------- set-up
C_S, CLASSES, B = 6, 5, 4
LAYOUTS = {
    "same": lambda k: [(8, 4, 4)] * k,
    # pooled down, kept, upsampled; the (8,4,4) teachers interleaved with the others
    "mixed": lambda k: [[(8, 4, 4), (5, 2, 2), (8, 4, 4), (7, 8, 8)][i % 4] for i in range(k)],
}


def _problem(k, layout, seed=0, plain_heads=True):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    shapes = LAYOUTS[layout](k)
    heads = [GlobalPoolHead(nn.Linear(s[0], CLASSES)) for s in shapes]
    if not plain_heads:  # a head that is not pool + one fc runs on its own
        heads[-1] = GlobalPoolHead(nn.Sequential(nn.Linear(shapes[-1][0], CLASSES)))
    legacy = Legacy(C_S, shapes, heads)
    with torch.no_grad():  # BN affine and statistics away from their defaults, so the conversion shows
        for c in legacy.connectors:
            bn = c.transfer[1]
            bn.weight.uniform_(0.5, 1.5, generator=g)
            bn.bias.normal_(0, 0.3, generator=g)
            bn.running_mean.normal_(0, 0.3, generator=g)
            bn.running_var.uniform_(0.5, 2.0, generator=g)
    feats = torch.randn(B, C_S, 4, 4, generator=g)
    teacher_feats = [torch.randn(B, *s, generator=g).half() for s in shapes]
    teacher_logits = torch.randn(k, B, CLASSES, generator=g) * 2
    labels = torch.randint(0, CLASSES, (B,), generator=g)
    student_logits = torch.randn(B, CLASSES, generator=g)
    return shapes, heads, legacy, feats, teacher_feats, teacher_logits, labels, student_logits


def _load_legacy(module, legacy, prefix=""):
    state = {prefix + k: v.clone() for k, v in legacy.state_dict().items()}
    with pytest.warns(UserWarning, match=r"converted a per-teacher CA-MKD state.*stacked teacher group"):
        module.load_state_dict(state)


def _close(actual, expected, scale: float = 1.0):
    """Equal to 1e-6 of the scale (the expected tensor's largest magnitude, at least `scale`): float32 sums taken
    in another order differ in their last bits."""
    scale = max(scale, float(expected.detach().abs().max()))
    torch.testing.assert_close(actual, expected, atol=1e-6 * scale, rtol=0)


def _grads_close(stacked_grad, ref_grads, scale: float):
    _close(stacked_grad, torch.cat(ref_grads), scale)


# ------------------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("mode", ["official", "detached", "logit"])
@pytest.mark.parametrize("layout", ["same", "mixed"])
def test_stacked_camkd_equals_per_teacher_code(layout, mode):
    """Loss terms, weights, BN statistics and every gradient (student map and logits, each connector's conv and
    BN) equal the per-teacher code to 1e-6, for K = 2..8, one shape or mixed shapes, stacked heads and a head
    that runs on its own, each feature_weights mode; the state of the per-teacher code loads (converted)."""
    for k in range(2, 9):
        _check_stacked_camkd(k, layout, mode)


def _check_stacked_camkd(k, layout, mode):
    shapes, heads, legacy, feats, tfeats, tlogits, labels, slogits = _problem(
        k, layout, plain_heads=k % 2 == 0
    )
    params = StrategyParams(feature_weights=mode, normalize="official" if k % 3 else "mean")
    names = [f"t{i}" for i in range(k)]
    strategy = create_strategy(
        "camkd", names, params, student_channels=C_S, teacher_feature_shapes=shapes, teacher_heads=heads
    )
    _load_legacy(strategy, legacy)
    s_feats, s_logits = feats.clone().requires_grad_(), slogits.clone().requires_grad_()
    out = strategy(s_logits, s_feats, labels, TeacherOutputs(tlogits, tfeats), epoch=1)
    r_feats, r_logits = feats.clone().requires_grad_(), slogits.clone().requires_grad_()
    ref_out = create_strategy("camkd_logits", names, params)(
        r_logits, None, labels, TeacherOutputs(tlogits), epoch=1
    )
    inter, w, _ = legacy.feature_term(r_feats, tfeats, labels, mode, ref_out.weights, params.normalize)
    ref_loss = ref_out.loss + params.beta * inter
    _close(out.loss, ref_loss)
    _close(out.terms["inter"], inter.detach())
    for i, n in enumerate(names):
        _close(out.terms[f"feat_weight/{n}"], w[i].mean().detach())
        torch.testing.assert_close(out.terms[f"weight/{n}"], ref_out.terms[f"weight/{n}"])
    out.loss.backward()
    ref_loss.backward()
    _close(s_feats.grad, r_feats.grad)
    _close(s_logits.grad, r_logits.grad)
    for g in strategy.teacher_groups.groups:
        refs = [legacy.connectors[i].transfer for i in g.members]
        c = g.connector
        # the gradient scale at the connector: the conv bias's own gradient is analytically 0 (the BatchNorm
        # after it removes the batch mean), so its computed value is rounding at that scale
        scale = max(float(c.conv.weight.grad.abs().max()), float(c.bn.weight.grad.abs().max()), 1.0)
        _grads_close(c.conv.weight.grad, [r[0].weight.grad for r in refs], scale)
        _grads_close(c.conv.bias.grad, [r[0].bias.grad for r in refs], scale)
        _grads_close(c.bn.weight.grad, [r[1].weight.grad for r in refs], scale)
        _grads_close(c.bn.bias.grad, [r[1].bias.grad for r in refs], scale)
        _grads_close(c.bn.running_mean, [r[1].running_mean for r in refs], 1.0)
        _grads_close(c.bn.running_var, [r[1].running_var for r in refs], 1.0)


@pytest.mark.parametrize("layout", ["same", "mixed"])
def test_one_teacher_group_equals_its_connector_and_head(layout):
    """K = 1 (a group of one): head logits and MSE equal the per-teacher connector and head."""
    shapes, heads, legacy, feats, tfeats, _, _, _ = _problem(1, layout)
    holder = nn.Module()
    holder.teacher_groups = TeacherGroups(C_S, shapes, heads)
    state = dict(legacy.state_dict())
    with pytest.warns(UserWarning, match="converted a per-teacher CA-MKD state"):
        assert holder.teacher_groups.convert_legacy_state(state, "")
    holder.load_state_dict(state)
    s_feats, r_feats = feats.clone().requires_grad_(), feats.clone().requires_grad_()
    head_logits, mse = holder.teacher_groups(s_feats, tfeats)
    e = legacy.connectors[0](r_feats)
    ref_logits, ref_mse = legacy.heads[0](e), (e - tfeats[0].float()).pow(2).reshape(B, -1).mean(-1)
    _close(head_logits[0], ref_logits)
    torch.testing.assert_close(mse[0], ref_mse)
    # gradients through the group's closed-form backward (heads and MSE) equal autograd's through the reference
    g = torch.Generator().manual_seed(5)
    g_logits, g_mse = torch.randn(ref_logits.shape, generator=g), torch.randn(ref_mse.shape, generator=g)
    ((head_logits[0] * g_logits).sum() + (mse[0] * g_mse).sum()).backward()
    ((ref_logits * g_logits).sum() + (ref_mse * g_mse).sum()).backward()
    _close(s_feats.grad, r_feats.grad)
    conv = holder.teacher_groups.groups[0].connector.conv
    _close(conv.weight.grad, legacy.connectors[0].transfer[0].weight.grad)


def test_a_legacy_distiller_checkpoint_loads_with_a_clear_message_and_its_optimizer_state_converts():
    """A Distiller state and SGD state written by the per-teacher code (camkd <= 0.1) load into the stacked
    strategy: the model converted with a warning naming the old layout, the momentum buffers stacked the same way."""
    k = 3
    shapes, heads, legacy, *_ = _problem(k, "mixed")
    names = ["a", "b", "c"]
    student = models.create("resnet8", CLASSES, 3)
    strategy = create_strategy(
        "camkd",
        names,
        student_channels=64,
        teacher_feature_shapes=[[8, 4, 4], [5, 2, 2], [8, 4, 4]],
        teacher_heads=heads,
    )
    distiller = Distiller(student, strategy)
    old = Legacy(64, [(8, 4, 4), (5, 2, 2), (8, 4, 4)], heads)
    old_state = {f"student.{k}": v for k, v in student.state_dict().items()}
    old_state.update({f"strategy.{k}": v for k, v in old.state_dict().items()})
    two = create_strategy(
        "camkd",
        names[:2],
        student_channels=64,
        teacher_feature_shapes=[[8, 4, 4], [5, 2, 2]],
        teacher_heads=heads[:2],
    )
    with pytest.raises(ValueError, match="3 connectors cannot load into a strategy of 2 teachers"):
        Distiller(student, two).load_state_dict(dict(old_state))
    with pytest.warns(UserWarning, match=r"3 teachers: connectors.<i>.\*, heads.<i>.\*.*save it again"):
        distiller.load_state_dict(old_state)
    group0 = strategy.teacher_groups.groups[0].connector
    torch.testing.assert_close(
        group0.conv.weight,
        torch.cat([old.connectors[0].transfer[0].weight, old.connectors[2].transfer[0].weight]),
    )
    # the optimizer's per-parameter state: old order = student's, then 4 tensors per teacher
    n_student = len(list(student.parameters()))
    old_params = list(student.parameters()) + [p for c in old.connectors for p in c.parameters()]
    old_opt = torch.optim.SGD(old_params, lr=0.1, momentum=0.9)
    for p in old_params:
        p.grad = torch.randn_like(p)
    old_opt.step()
    from camkd.optim import load_optimizer_state

    new_params = [p for p in distiller.parameters() if p.requires_grad]
    new_opt = torch.optim.SGD(new_params, lr=0.1, momentum=0.9)
    with pytest.warns(UserWarning, match="optimizer state.*per-teacher"):
        load_optimizer_state(new_opt, old_opt.state_dict(), distiller)
    buf = new_opt.state[group0.conv.weight]["momentum_buffer"]
    torch.testing.assert_close(
        buf,
        torch.cat([old_opt.state[old_params[n_student + 4 * i]]["momentum_buffer"] for i in (0, 2)]),
    )


class OpCount(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def _fwd_bwd_ops(name: str, k: int, heads) -> int:
    """ATen ops of one forward + loss + backward of resnet8x4 with `name` and K resnet32x4-shaped teachers."""
    torch.manual_seed(0)
    student = models.create("resnet8x4", 100, 3)
    kwargs = {}
    if name == "camkd":
        kwargs = dict(student_channels=256, teacher_feature_shapes=[[256, 8, 8]] * k, teacher_heads=heads[:k])
    distiller = Distiller(student, create_strategy(name, [f"t{i}" for i in range(k)], **kwargs))
    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 100, (2,))
    teachers = TeacherOutputs(
        torch.randn(k, 2, 100) if k else None,
        [torch.randn(2, 256, 8, 8).half() for _ in range(k)] if kwargs else None,
    )
    distiller(x, y, teachers, 1)[0].backward()  # warm-up
    distiller.zero_grad(set_to_none=True)
    with OpCount() as c:
        distiller(x, y, teachers, 1)[0].backward()
    return c.count


def test_camkd_step_ops_stay_near_ce_and_a_teacher_adds_data_not_ops():
    """Forward + loss + backward of cached CA-MKD (resnet32x4-shaped teachers → resnet8x4): at K = 3 at most 1.5×
    CE's ATen ops (2.3× with one connector, head and loss per teacher; 1.66× stacked; 1.49× with the closed-form
    backward passes of `camkd.closed_form`), and an extra teacher of the same shape adds no op (~40 before)."""
    heads = [GlobalPoolHead(nn.Linear(256, 100)) for _ in range(8)]
    ce = _fwd_bwd_ops("ce", 0, heads)
    k3, k8 = _fwd_bwd_ops("camkd", 3, heads), _fwd_bwd_ops("camkd", 8, heads)
    assert k3 <= 1.5 * ce, (ce, k3)
    assert k8 == k3, (k3, k8)


@functools.lru_cache(maxsize=1)
def _ce_ops() -> int:
    return _fwd_bwd_ops("ce", 0, [])


# ATen ops a weighted-KL strategy may add to CE's forward + loss + backward: 16 for the KL and the CE with
# `closed_form.CrossEntropyAndKL` (24–26 with autograd's backward), plus what its weights cost (EBKD's entropies 9,
# CA-MKD's confidences 8)
EXTRA_OPS = {"kd": 16, "aver": 16, "ebkd": 25, "camkd_logits": 24}


@pytest.mark.parametrize("name", sorted(EXTRA_OPS))
def test_a_weighted_kl_strategy_adds_few_ops_to_ce_whatever_k(name):
    """The logit strategies whose KD term is a weighted KL (kd, aver, ebkd, camkd_logits): forward + loss +
    backward at most EXTRA_OPS more ATen ops than CE's (8 more each with autograd's backward of the KL), the same
    at K = 3 and 8."""
    ce = _ce_ops()
    counts = [_fwd_bwd_ops(name, k, []) for k in ((1,) if name == "kd" else (3, 8))]
    assert max(counts) - ce <= EXTRA_OPS[name] and len(set(counts)) == 1, (ce, counts)


# ------------------------------------------------------------------------------------------- the optimizer
def _optimizer_ops(model) -> int:
    from camkd.optim import build_optimizer

    opt = build_optimizer(model.parameters(), lr=0.05)
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.ones_like(p)
    opt.step()
    with OpCount() as c:
        opt.step()
    return c.count


def test_the_optimizer_is_the_per_parameter_update_in_a_few_ops_whatever_the_parameter_count():
    """build_optimizer's SGD (fused where torch has it for the device, else foreach) makes the same update as
    torch's per-parameter loop, step after step, with parameters that join late (CA-MKD's connectors after the
    warm-up: no gradient, no decay, no momentum before); and it is at most 10 ops for resnet8 as for resnet8x4 +
    CA-MKD's connectors (the per-parameter loop: ~5 per parameter)."""
    import copy

    from camkd.optim import build_optimizer

    torch.manual_seed(0)
    model = models.create("resnet8", 10, 3)
    ref = copy.deepcopy(model)
    opt = build_optimizer(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    ref_opt = torch.optim.SGD(
        ref.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4, foreach=False
    )
    late = len(list(model.parameters())) - 2  # the fc layer joins at step 2
    g = torch.Generator().manual_seed(1)
    for step in range(4):
        for i, (p, r) in enumerate(zip(model.parameters(), ref.parameters())):
            grad = None if (i >= late and step < 2) else torch.randn(p.shape, generator=g)
            p.grad, r.grad = grad, None if grad is None else grad.clone()
        opt.step()
        ref_opt.step()
        for p, r in zip(model.parameters(), ref.parameters()):
            torch.testing.assert_close(p, r, atol=1e-6, rtol=1e-6)
    # a state torch's SGD wrote before the late parameters joined (no buffers for them) loads and steps
    fresh = copy.deepcopy(model)
    warm = torch.optim.SGD(fresh.parameters(), lr=0.05, momentum=0.9)
    for i, p in enumerate(fresh.parameters()):
        p.grad = None if i >= late else torch.ones_like(p)
    warm.step()
    resumed = build_optimizer(fresh.parameters(), lr=0.05, momentum=0.9)
    resumed.load_state_dict(warm.state_dict())
    for p in fresh.parameters():
        p.grad = torch.ones_like(p)
    resumed.step()
    small = _optimizer_ops(models.create("resnet8", 10, 3))
    heads = [GlobalPoolHead(nn.Linear(256, 100)) for _ in range(3)]
    shapes = [[256, 8, 8]] * 3
    strategy = create_strategy(
        "camkd", ["a", "b", "c"], student_channels=256, teacher_feature_shapes=shapes, teacher_heads=heads
    )
    large = _optimizer_ops(Distiller(models.create("resnet8x4", 100, 3), strategy))
    assert small <= 10 and large <= 10, (small, large)


# ------------------------------------------------------------------------------------ one compiled graph
def _compiled_pair(name: str, backend: str, lr: float = 0.01):
    """An eager TrainStep and one with the whole step compiled, from the same initial state; resnet8 students,
    two resnet8-shaped teachers (one for kd), a MultiStepLR that moves the rate after epoch 2."""
    from camkd.optim import build_optimizer
    from camkd.training import TrainStep

    torch.manual_seed(0)
    heads = [models.create("resnet8", 10, 3).head for _ in range(2)]
    k = {"ce": 0, "kd": 1}.get(name, 2)
    pair = []
    for _ in range(2):
        torch.manual_seed(1)
        student = models.create("resnet8", 10, 3)
        kw = {}
        if name == "camkd":
            kw = dict(student_channels=64, teacher_feature_shapes=[[64, 8, 8]] * 2, teacher_heads=heads)
        params = StrategyParams(beta=5.0, dkd_warmup_epochs=2)
        distiller = Distiller(student, create_strategy(name, ["a", "b"][:k], params, **kw))
        opt = build_optimizer(distiller.parameters(), lr=lr)
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, [2], 0.1)
        pair.append((TrainStep(distiller, distiller, opt, torch.device("cpu"), None), sched))
    pair[1][0].compile_whole(backend=backend)
    g = torch.Generator().manual_seed(2)
    batches = []
    for _ in range(7):
        x, y = torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)
        logits = torch.randn(k, 8, 10, generator=g) if k else None
        feats = [(0.3 * torch.rand(8, 64, 8, 8, generator=g)).half() for _ in range(k)] if kw else None
        batches.append((x, y, TeacherOutputs(logits, feats)))
    return pair, batches


def _three_epochs(pair, batches, steps: int) -> float:
    """Both steps over `steps` batches per epoch for 3 epochs; the largest |eager loss − compiled loss|."""
    worst = 0.0
    for epoch in range(3):
        for x, y, t in batches[:steps]:
            eager = pair[0][0].run(x, y, t, epoch)[0]
            compiled = pair[1][0].run(x, y, t, epoch)[0]
            worst = max(worst, abs(float(eager.detach()) - float(compiled)))
        for _, sched in pair:
            sched.step()
    return worst


@pytest.mark.parametrize(
    "name",
    ["camkd"]
    + [pytest.param(n, marks=pytest.mark.slow) for n in ("ce", "kd", "aver", "ebkd", "dkd", "camkd_logits")],
)
def test_every_strategy_compiles_to_one_graph_with_no_break_and_no_recompile_across_epochs(name):
    """train.compile: forward, loss, backward and the optimizer in one `fullgraph=True` graph (a graph break is an
    error) for every strategy; over 3 epochs (CA-MKD's warm-up switch, DKD's ramp, a learning-rate milestone) at
    most two graphs: one per warm-up phase. Traced with dynamo's "eager" backend (no code generation)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    pair, batches = _compiled_pair(name, "eager")
    _three_epochs(pair, batches, steps=2)
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == (2 if name == "camkd" else 1), dict(counters["stats"])
    torch._dynamo.reset()


@pytest.mark.slow
def test_the_inductor_compiled_step_trains_as_the_eager_one():
    """CA-MKD (warm-up, then the feature term; a learning-rate milestone) compiled with inductor, against eager:
    the losses of 21 steps over 3 epochs agree to 1e-4, with no graph break and two graphs."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    pair, batches = _compiled_pair("camkd", "inductor")
    assert _three_epochs(pair, batches, steps=7) < 1e-4
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 2
    torch._dynamo.reset()


def test_evaluation_is_one_compiled_graph_per_batch_size_and_scores_as_eager():
    """train.compile scores val/test batches as one `fullgraph=True` graph each (normalise, forward, hits and
    loss sums): the same sums as eager to 1e-4, no graph break, and the last smaller batch adds one graph (with a
    dynamic batch size: the next split's last batch adds none). Traced with dynamo's "eager" backend."""
    from torch._dynamo.utils import counters

    from camkd.training import Normalizer
    from pipeline.train.step import evaluate

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    student = models.create("resnet8", 10, 3)
    normalizer = Normalizer((0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
    g = torch.Generator().manual_seed(3)
    batches = [
        (torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8), torch.randint(0, 10, (n,)))
        for n in (8, 8, 5, 8, 3)
    ]
    cpu = torch.device("cpu")
    eager = evaluate(student, batches, normalizer, None, cpu).values
    compiled = evaluate(student, batches, normalizer, None, cpu, backend="eager").values
    torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=1e-6)
    assert float(eager[3]) == 32.0 and student.training
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] <= 2, dict(counters["stats"])
    torch._dynamo.reset()
