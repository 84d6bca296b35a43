"""ONNX export of a classifier, with its parity against the PyTorch model checked by onnxruntime.

The export uses torch's own exporter (`torch.onnx.export(dynamo=True)`, which needs `onnxscript`) from a
`torch.export` program with a dynamic batch dimension; input `images` [B,C,H,W] float32, output `logits` [B,K].
Both packages are optional (`pip install 'camkd-ray[onnx]'`); `available()` says whether they are installed.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io

import torch
from torch import nn

ONNX_EXTRA = "pip install 'camkd-ray[onnx]'"
OPSET = 18
INPUT, OUTPUT = "images", "logits"


def missing() -> list[str]:
    """The packages ONNX export and its check need that are not installed ([] when all are)."""
    return [m for m in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(m) is None]


def to_onnx(
    model: nn.Module, example: torch.Tensor, program: torch.export.ExportedProgram | None = None
) -> bytes:
    """The ONNX bytes of `model` (eval mode) with a dynamic batch; `program` reuses a `torch.export` of it."""
    absent = [m for m in missing() if m != "onnxruntime"]
    if absent:
        raise RuntimeError(f"ONNX export needs {absent}: {ONNX_EXTRA}")
    if program is None:
        batch = torch.export.Dim("batch", min=1, max=65536)
        program = torch.export.export(model.eval(), (example,), dynamic_shapes=({0: batch},))
    # the exporter prints its progress to stdout; a training log wants one line, written by the caller
    with contextlib.redirect_stdout(io.StringIO()):
        onnx_program = torch.onnx.export(
            program,
            (example,),
            dynamo=True,
            input_names=[INPUT],
            output_names=[OUTPUT],
            opset_version=OPSET,
            verbose=False,
            optimize=True,
        )
    return onnx_program.model_proto.SerializeToString()


def run_onnx(onnx_bytes: bytes, images: torch.Tensor, threads: int | None = None):
    """The logits onnxruntime computes for `images` (NumPy [B,K]), on its CPU provider."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    session = onnxruntime.InferenceSession(onnx_bytes, options, providers=["CPUExecutionProvider"])
    return session.run([OUTPUT], {INPUT: images.detach().cpu().float().numpy()})[0]


def parity(onnx_bytes: bytes, model: nn.Module, images: torch.Tensor) -> float:
    """max |onnxruntime logits − PyTorch logits| on `images` (the model in eval mode, on the CPU)."""
    model = model.eval()
    with torch.no_grad():
        ref = model(images.cpu().float()).numpy()
    return float(abs(run_onnx(onnx_bytes, images) - ref).max())
