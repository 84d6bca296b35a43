"""GPU correctness of the AMP and DDP paths of the training step, plus teacher-inference throughput.

Needs only torch + camkd (no Ray): it exercises the exact modules the Ray workers run (camkd.Distiller wrapped in
DistributedDataParallel, camkd.training.TrainStep under autocast / GradScaler). Prints PASS/FAIL lines and a final
JSON object.

    python benchmarks/gpu_check.py
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

from camkd import Distiller, TeacherOutputs, create_strategy, models
from camkd.training import TrainStep, normalize

MEAN, STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
RESULTS: dict = {"checks": {}}


def check(name: str, ok: bool, detail: str = "") -> None:
    RESULTS["checks"][name] = {"ok": bool(ok), "detail": detail}
    print(f"{'PASS' if ok else 'FAIL'} {name} {detail}", flush=True)


def problem(device, seed=0, b=64, k=3):
    torch.manual_seed(seed)
    teachers = [models.create("resnet32x4", 100, 3).to(device).eval() for _ in range(k)]
    images = torch.randint(0, 256, (b, 3, 32, 32), dtype=torch.uint8, device=device)
    labels = torch.randint(0, 100, (b,), device=device)
    x = normalize(images, MEAN, STD)
    with torch.no_grad():
        fm = [t.forward_features(x) for t in teachers]
        out = TeacherOutputs(
            torch.stack([t.forward_head(f) for t, f in zip(teachers, fm)]).half().float(),
            [f.half().float() for f in fm],
        )
    return teachers, x, labels, out


def distiller(teachers, device, seed=1):
    torch.manual_seed(seed)
    student = models.create("resnet8x4", 100, 3)
    strategy = create_strategy(
        "camkd",
        [f"t{i}" for i in range(len(teachers))],
        student_channels=student.feature_channels,
        teacher_feature_shapes=[[256, 8, 8]] * len(teachers),
        teacher_heads=[t.head for t in teachers],
    )
    return Distiller(student, strategy).to(device)


def sgd(m):
    return torch.optim.SGD(
        [p for p in m.parameters() if p.requires_grad],
        lr=0.05,
        momentum=0.9,
        nesterov=True,
        weight_decay=5e-4,
    )


def amp_checks(device) -> None:
    teachers, x, y, out = problem(device)
    base = distiller(teachers, device)
    terms = {}
    for name, dtype in (("fp32", None), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
        d = distiller(teachers, device)
        d.load_state_dict(base.state_dict())
        step = TrainStep(d, d, sgd(d), device, dtype)
        loss, _, t, _ = step.forward(x, y, out, epoch=1)
        terms[name] = {k: v.item() for k, v in t.items()}
    for name in ("bf16", "fp16"):
        worst = max(
            abs(terms[name][k] - terms["fp32"][k]) / max(abs(terms["fp32"][k]), 1e-3)
            for k in ("ce", "kd", "inter")
        )
        check(f"amp_{name}_terms_match_fp32", worst < 0.05, f"max relative diff {worst:.2e} (ce/kd/inter)")
    for name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        d = distiller(teachers, device)
        step = TrainStep(d, d, sgd(d), device, dtype)
        losses = []
        for i in range(30):
            loss, *_ = step.forward(
                x, y, out, epoch=0 if i < 3 else 1
            )  # the warm-up epoch path, then the full loss
            step.backward_and_step(loss, epoch=0 if i < 3 else 1)
            losses.append(loss.item())
        ok = all(map(lambda v: v == v and abs(v) != float("inf"), losses)) and losses[-1] < losses[3]
        check(
            f"amp_{name}_training_overfits_a_batch",
            ok,
            f"loss {losses[3]:.3f} → {losses[-1]:.3f}"
            + (f", scaler scale {step.scaler.get_scale():.0f}" if dtype == torch.float16 else ""),
        )


def _ddp_worker(rank: int, world: int, backend: str, port: int, q) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group(backend, rank=rank, world_size=world)
    device = torch.device("cuda", 0)
    teachers, x, y, out = problem(device, seed=0)
    d = distiller(teachers, device)
    model = DDP(d, device_ids=[0])
    step = TrainStep(model, d, sgd(d), device, torch.bfloat16)
    sl = slice(rank * 32, rank * 32 + 32)
    part = TeacherOutputs(out.logits[:, sl], [f[sl] for f in out.features])
    for epoch in (0, 0, 1, 1):  # epoch 0: connectors idle (0·inter keeps DDP's graph complete)
        loss, *_ = step.forward(x[sl], y[sl], part, epoch)
        step.backward_and_step(loss, epoch)
    flat = torch.cat([p.detach().float().flatten() for p in d.parameters()])
    gathered = [torch.zeros_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    q.put((rank, max((g - gathered[0]).abs().max().item() for g in gathered), loss.item()))
    dist.destroy_process_group()


def ddp_checks() -> None:
    for backend, world in (("nccl", 1), ("gloo", 2)):
        ctx = mp.get_context("spawn")
        q = ctx.Queue()
        procs = [
            ctx.Process(target=_ddp_worker, args=(r, world, backend, 29500 + world, q)) for r in range(world)
        ]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=300)
        res = [q.get(timeout=5) for _ in range(world)] if all(p.exitcode == 0 for p in procs) else []
        ok = len(res) == world and all(r[1] == 0.0 and r[2] == r[2] for r in res)
        check(
            f"ddp_{backend}_world{world}_params_in_sync",
            ok,
            f"results {res} exitcodes {[p.exitcode for p in procs]}",
        )


def inference_throughput(device) -> None:
    model = models.create("resnet32x4", 100, 3).to(device).eval()
    x = torch.randn(512, 3, 32, 32, device=device)
    for dtype in (None, torch.bfloat16):
        with torch.no_grad(), torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
            for _ in range(3):
                model.forward_head(model.forward_features(x))
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(20):
                model.forward_head(model.forward_features(x))
            torch.cuda.synchronize()
        RESULTS[f"teacher_inference_images_per_s_{'bf16' if dtype else 'fp32'}"] = round(
            20 * 512 / (time.perf_counter() - t)
        )
        print(
            f"resnet32x4 inference ({'bf16' if dtype else 'fp32'}, batch 512): "
            f"{RESULTS['teacher_inference_images_per_s_' + ('bf16' if dtype else 'fp32')]} images/s"
        )


def main() -> None:
    assert torch.cuda.is_available(), "needs a CUDA GPU"
    device = torch.device("cuda")
    RESULTS["device"] = torch.cuda.get_device_name()
    RESULTS["torch"] = torch.__version__
    print(RESULTS["device"], torch.__version__, flush=True)
    amp_checks(device)
    ddp_checks()
    inference_throughput(device)
    RESULTS["all_ok"] = all(c["ok"] for c in RESULTS["checks"].values())
    print(json.dumps(RESULTS))


if __name__ == "__main__":
    main()
