"""A training step — forward, loss, backward and the optimizer's update — as one `torch.compile(fullgraph=True)`
graph: on a GPU with mode="reduce-overhead" one CUDA graph replays it, whatever the number of ops inside.

The graph never changes across epochs: the epoch and the learning rate reach it as device tensors (filled when
they change, not rebuilt), and the one Python-level switch, whether CA-MKD's connectors still sit out their
warm-up, is a constant of the call: at most two graphs per run. Batches must be of one size (the trainer's are:
every share is a multiple of the batch and the last partial batch is dropped). Needs a single-process model (not
DDP) and a torch.optim.SGD; fp16 with its GradScaler stays eager. Never imports Ray.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.optim.sgd import sgd

from camkd.optim import fill_momentum_buffers
from camkd.strategies import TeacherOutputs


def can_compile_whole(model: nn.Module, optimizer: torch.optim.Optimizer, dtype) -> str | None:
    """None if the whole step can be one graph, else why not."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return "DistributedDataParallel splits the graph at its gradient buckets"
    if not isinstance(optimizer, torch.optim.SGD) or len(optimizer.param_groups) != 1:
        return "the whole-step graph runs SGD with one parameter group"
    if dtype == torch.float16:
        return "fp16's GradScaler stays eager"
    return None


class CompiledStep:
    """`step(images, labels, teachers, epoch)` → (loss, student logits, named terms, teacher weights), after the
    parameters were updated: what TrainStep.forward + backward_and_step do, as one compiled graph."""

    def __init__(self, train_step, backend: str = "inductor", mode: str | None = None) -> None:
        why = can_compile_whole(train_step.model, train_step.optimizer, train_step.dtype)
        if why is not None:
            raise ValueError(f"cannot compile the whole training step: {why}")
        self.step, self.optimizer = train_step, train_step.optimizer
        self.group = self.optimizer.param_groups[0]
        self.params: list[nn.Parameter] = list(self.group["params"])
        fill_momentum_buffers(self.optimizer)
        for p in self.params:  # the graph starts from no gradients, as it leaves them (else one more graph)
            p.grad = None
        device = train_step.device
        self.lr = torch.tensor(float(self.group["lr"]), dtype=torch.float32, device=device)
        self.epoch = torch.zeros((), dtype=torch.int64, device=device)
        self._lr, self._epoch = float(self.group["lr"]), 0
        self._compiled = torch.compile(self._step, fullgraph=True, backend=backend, mode=mode)

    def __call__(self, images: Tensor, labels: Tensor, teachers: TeacherOutputs, epoch: int):
        if float(self.group["lr"]) != self._lr:  # the scheduler moved it: once per milestone
            self._lr = float(self.group["lr"])
            self.lr.fill_(self._lr)
        if epoch != self._epoch:
            self._epoch = epoch
            self.epoch.fill_(epoch)
        self.optimizer._opt_called = True  # what optimizer.step() records, so LR schedulers do not warn
        idle = {id(p) for p in self.step.distiller.strategy.idle_parameters(epoch)}
        active = tuple(i for i, p in enumerate(self.params) if id(p) not in idle)
        with torch._dynamo.config.patch(trace_autograd_ops=True):
            return self._compiled(images, labels, teachers.logits, teachers.features, active)

    def _step(self, images, labels, teacher_logits, teacher_features, active: tuple[int, ...]):
        step = self.step
        with torch.autocast(
            step.device.type, dtype=step.dtype or torch.float32, enabled=step.dtype is not None
        ):
            loss, logits, terms, weights = step.model(
                images, labels, TeacherOutputs(teacher_logits, teacher_features), self.epoch
            )
        loss.backward()
        params = [self.params[i] for i in active]  # the idle ones (warm-up) get no update, as in eager
        state, g = self.optimizer.state, self.group
        with torch.no_grad():
            sgd(
                params,
                [p.grad for p in params],
                [state[p].get("momentum_buffer") for p in params],
                weight_decay=g["weight_decay"],
                momentum=g["momentum"],
                lr=self.lr,
                dampening=g["dampening"],
                nesterov=g["nesterov"],
                maximize=g["maximize"],
                foreach=True,
            )
        for p in self.params:
            p.grad = None
        return loss.detach(), logits.detach(), terms, weights
