"""What one training step costs a launch-bound GPU, counted on CPU: ATen ops per step for every strategy.

On a GPU a CIFAR-sized student is launch-bound (one kernel per ATen op), so the op count of a step predicts its
speed there, and it is the same on every device. For ce, kd, aver, ebkd, dkd, camkd_logits and camkd at K = 1, 3
and 8 resnet32x4 teachers → resnet8x4 (CIFAR-100 shapes), in cached-teacher mode (random teacher logits and fp16
feature maps of the right shapes, the teachers' frozen heads, as `pipeline/train/step.py` feeds camkd's
Distiller), through the step the trainer runs (`camkd.training.TrainStep`), it counts with a TorchDispatchMode:
- the ops of forward + loss + backward, and those of the optimizer step (after a warm-up step);
- dynamo's graph breaks and graphs when the step is compiled as `train.compile` compiles it (backend "eager":
  tracing only, seconds);
- eager CPU step time ÷ CE's at batch 64 and 256 (K = 3; interleaved rounds, medians);
- with --inductor: inductor-compiled step time ÷ eager (minutes on 2 cores: opt in per strategy).
kd takes exactly one teacher and camkd / camkd_logits at least two: those (strategy, K) pairs are skipped.
The last line is one JSON object: ops_fwd_bwd, ops_optimizer, graph_breaks, graphs per strategy and K.

    python benchmarks/step_cost.py                          # seconds
    python benchmarks/step_cost.py --inductor ce,camkd      # plus compiled ÷ eager at batch 64
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from camkd import Distiller, StrategyParams, TeacherOutputs, create_strategy, models, strategy_class
from camkd.training import TrainStep

TEACHER, STUDENT, CLASSES = "resnet32x4", "resnet8x4", 100
STRATEGIES = ("ce", "kd", "aver", "ebkd", "dkd", "camkd_logits", "camkd")
EPOCH = 1  # past CA-MKD's warm-up: every term in the loss


class OpCounter(TorchDispatchMode):
    """Counts every ATen op dispatched inside (views included: each is a dispatch the host pays for)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def applies(strategy: str, k: int) -> bool:
    cls = strategy_class(strategy)
    if strategy == "ce":
        return k == 0
    return k >= cls.min_teachers and (cls.max_teachers is None or k <= cls.max_teachers)


def build_optimizer(distiller: torch.nn.Module) -> torch.optim.Optimizer:
    """The trainer's optimizer (the paper recipe)."""
    params = [p for p in distiller.parameters() if p.requires_grad]
    try:
        from camkd.optim import build_optimizer as build
    except ImportError:  # before the optimizer was built in camkd: the worker's plain SGD
        return torch.optim.SGD(params, lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    return build(params, lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)


class Setup:
    """One strategy with K teachers at one batch size: a Distiller, its optimizer, its TrainStep and one batch."""

    def __init__(self, strategy: str, k: int, batch: int, heads: list, seed: int = 0) -> None:
        torch.manual_seed(seed)
        student = models.create(STUDENT, CLASSES, 3)
        names = [f"t{i}" for i in range(k)]
        kwargs = {}
        if strategy_class(strategy).needs_features:
            kwargs = {
                "student_channels": student.feature_channels,
                "teacher_feature_shapes": [[256, 8, 8]] * k,
                "teacher_heads": heads[:k],
            }
        self.distiller = Distiller(student, create_strategy(strategy, names, StrategyParams(), **kwargs))
        self.optimizer = build_optimizer(self.distiller)
        self.step = TrainStep(self.distiller, self.distiller, self.optimizer, torch.device("cpu"), None)
        g = torch.Generator().manual_seed(seed)
        self.images = torch.randn(batch, 3, 32, 32, generator=g)
        self.labels = torch.randint(0, CLASSES, (batch,), generator=g)
        logits = torch.randn(k, batch, CLASSES, generator=g).half().float() * 3 if k else None
        feats = [torch.rand(batch, 256, 8, 8, generator=g).half() for _ in range(k)] if kwargs else None
        self.teachers = TeacherOutputs(logits, feats)

    def forward_backward(self) -> None:
        loss, *_ = self.step.forward(self.images, self.labels, self.teachers, EPOCH)
        self.optimizer.zero_grad(set_to_none=True)
        self.step.scaler.scale(loss).backward()
        for p in self.distiller.strategy.idle_parameters(EPOCH):
            p.grad = None

    def optimizer_step(self) -> None:
        self.step.scaler.step(self.optimizer)
        self.step.scaler.update()

    def one(self) -> None:
        loss, *_ = self.step.forward(self.images, self.labels, self.teachers, EPOCH)
        self.step.backward_and_step(loss, EPOCH)

    def count(self) -> tuple[int, int]:
        self.forward_backward()
        self.optimizer_step()  # warm-up: momentum buffers exist from here on
        with OpCounter() as fb:
            self.forward_backward()
        with OpCounter() as opt:
            self.optimizer_step()
        return fb.count, opt.count


def graph_breaks(setup: Setup) -> tuple[int, int]:
    """Dynamo's graph breaks and graphs over two steps when the step is compiled the way train.compile does."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    compiled = getattr(setup.step, "compiled", None)
    if compiled is not None:  # the whole step as one graph
        run = compiled(backend="eager")
        for _ in range(2):
            run(setup.images, setup.labels, setup.teachers, EPOCH)
    else:  # today's train.compile: torch.compile(model); the step's other parts around it
        fn = torch.compile(setup.one, backend="eager")
        for _ in range(2):
            fn()
    breaks = sum(counters["graph_break"].values())
    graphs = counters["stats"]["unique_graphs"]
    torch._dynamo.reset()
    return breaks, graphs


def timed(runs: dict, steps: int, rounds: int) -> dict[str, float]:
    """Median seconds per step of each run (a callable doing one step); runs interleaved round by round."""
    for run in runs.values():
        run()
    samples: dict[str, list[float]] = {n: [] for n in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            start = time.perf_counter()
            for _ in range(steps):
                run()
            samples[name].append((time.perf_counter() - start) / steps)
    return {n: statistics.median(v) for n, v in samples.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ks", default="1,3,8", help="teacher counts")
    ap.add_argument("--strategies", default=",".join(STRATEGIES))
    ap.add_argument("--batches", default="64,256", help="batch sizes of the eager time ratios (K = 3)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--inductor", default="", help="strategies whose inductor-compiled step is timed (K=3)")
    ap.add_argument("--no-compile", action="store_true", help="skip the graph-break count")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ks = [int(k) for k in args.ks.split(",")]
    strategies = [s for s in args.strategies.split(",") if s]
    torch.manual_seed(0)
    heads = [models.create(TEACHER, CLASSES, 3).head for _ in range(max(ks))]
    result: dict = {"machine": platform.platform(), "torch": torch.__version__, "threads": args.threads}
    result.update(ops_fwd_bwd={}, ops_optimizer={}, graph_breaks={}, graphs={}, skipped=[])
    print(f"{'strategy':14s} {'K':>2s} {'fwd+bwd':>8s} {'optim':>6s} {'breaks':>6s} {'graphs':>6s}")
    for name in strategies:
        for k in [0] if name == "ce" else ks:
            if not applies(name, k):
                result["skipped"].append(f"{name}@K={k}")
                continue
            setup = Setup(name, k, 64, heads)
            fb, opt = setup.count()
            breaks, graphs = (None, None) if args.no_compile else graph_breaks(setup)
            key = name if name == "ce" else f"{name}@{k}"
            result["ops_fwd_bwd"][key], result["ops_optimizer"][key] = fb, opt
            result["graph_breaks"][key], result["graphs"][key] = breaks, graphs
            print(f"{name:14s} {k:2d} {fb:8d} {opt:6d} {breaks!s:>6s} {graphs!s:>6s}", flush=True)
    k3 = [s for s in strategies if applies(s, 0 if s == "ce" else 3)]
    result["time_vs_ce"] = {}
    for b in [int(x) for x in args.batches.split(",") if x]:
        secs = timed({s: Setup(s, 0 if s == "ce" else 3, b, heads).one for s in k3}, args.steps, args.rounds)
        result["time_vs_ce"][b] = {s: round(secs[s] / secs["ce"], 3) for s in secs} if "ce" in secs else {}
        print(f"batch {b}: eager step s " + ", ".join(f"{s} {v:.3f}" for s, v in secs.items()), flush=True)
    result["inductor_vs_eager"] = {}
    for s in [x for x in args.inductor.split(",") if x]:
        k = 0 if s == "ce" else 3
        runs = {"eager": Setup(s, k, 64, heads).one, "inductor": inductor_step(Setup(s, k, 64, heads))}
        secs = timed(runs, args.steps, args.rounds)
        result["inductor_vs_eager"][s] = round(secs["inductor"] / secs["eager"], 3)
        print(f"{s}: inductor {secs['inductor']:.3f} s/step, eager {secs['eager']:.3f} s/step", flush=True)
    print(json.dumps(result))


def inductor_step(setup: Setup):
    """One step of `setup` compiled with inductor as train.compile compiles it (the first call compiles)."""
    compiled = getattr(setup.step, "compiled", None)
    if compiled is not None:
        fn = compiled()
        return lambda: fn(setup.images, setup.labels, setup.teachers, EPOCH)
    setup.step.model = torch.compile(setup.step.model)
    return setup.one


if __name__ == "__main__":
    main()
