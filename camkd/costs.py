"""What a student costs to deploy, counted from the model itself: parameters and multiply-accumulates per image.

MACs come from torch's own `FlopCounterMode` over one forward pass of a single image (convolutions, matrix
multiplies, attention: the operations it counts, each at 2 FLOPs per multiply-accumulate); normalisation,
activations and additions are not counted, as in the usual published MAC figures. Pure torch: never imports Ray.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def parameter_count(model: nn.Module) -> int:
    """Every parameter's elements (trainable or not); buffers such as BatchNorm's running statistics excluded."""
    return sum(p.numel() for p in model.parameters())


def macs_per_image(model: nn.Module, in_chans: int, height: int, width: int | None = None) -> int:
    """Multiply-accumulates of one forward pass of one `in_chans × height × width` image, in eval mode (the
    model's mode is restored). Runs on the model's device."""
    was_training = model.training
    device = next(model.parameters()).device
    x = torch.zeros(1, in_chans, height, width or height, device=device)
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2


def latency(
    model: nn.Module,
    in_chans: int,
    height: int,
    width: int | None = None,
    *,
    batch: int = 64,
    repeats: int = 50,
    warmup: int = 5,
    threads: int | None = None,
    rounds: int = 3,
) -> dict[str, float | int | str]:
    """Inference latency of `model` on the device it is on, in eval mode under `inference_mode` (the model's mode
    is restored): batch-1 p50 / p90 over `repeats` timed forwards after `warmup` untimed ones, and batch-`batch`
    throughput (images/s) over max(5, repeats // 5) forwards. Each is measured `rounds` times and the quietest
    round kept (lowest p50, highest throughput): a process that still runs elsewhere on the machine for a second
    (a finished trial shutting down) then costs a round, not the figure. On CPU, `threads` sets torch's intra-op
    threads for the measurement (restored after); each GPU forward is timed to its end (one synchronisation per
    forward)."""
    import statistics
    import time

    device = next(model.parameters()).device
    cuda = device.type == "cuda"
    previous_threads = torch.get_num_threads()
    if threads and not cuda:
        torch.set_num_threads(threads)
    was_training = model.training
    model.eval()

    def timed(x: torch.Tensor) -> float:
        t0 = time.perf_counter()
        model(x)
        if cuda:
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0

    try:
        with torch.inference_mode():
            one = torch.randn(1, in_chans, height, width or height, device=device)
            many = torch.randn(batch, in_chans, height, width or height, device=device)
            for _ in range(warmup):
                timed(one)
            timed(many)
            n_batches = max(5, repeats // 5)
            b1, bn = None, float("inf")
            for _ in range(max(1, rounds)):
                this = sorted(timed(one) for _ in range(repeats))
                if b1 is None or statistics.median(this) < statistics.median(b1):
                    b1 = this
                bn = min(bn, sum(timed(many) for _ in range(n_batches)))
    finally:
        model.train(was_training)
        torch.set_num_threads(previous_threads)
    p90 = statistics.quantiles(b1, n=10, method="inclusive")[-1]
    return {
        "latency_ms_b1_p50": round(statistics.median(b1) * 1e3, 4),
        "latency_ms_b1_p90": round(p90 * 1e3, 4),
        "throughput_bN": round(batch * n_batches / bn, 1),
        "batch_n": batch,
        "repeats": repeats,
        "rounds": max(1, rounds),
        "threads": torch.get_num_threads() if cuda else (threads or previous_threads),
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
    }
