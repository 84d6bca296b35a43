"""The cache's output encodings computed with torch, on the device that ran the teacher.

Precompute's teacher actors encode each batch where it was computed, so what crosses Ray's object store is what is
stored: fp16 logits or top-k (values, indices, tail logit), fp16 maps or int8 maps with their per-channel scales,
plus the teacher's hits and a flag for non-finite outputs, all without a host sync per batch. The arithmetic is the
NumPy encoders' (`pipeline/cache/layout.py`) op for op: int8 maps are bit-identical to `quantize_int8` of the same float16
maps; top-k keeps the same index set with equal values as `topk_encode` (it may list them in another order, which
no reader depends on). Imported by the actors only (it imports torch).
"""

from __future__ import annotations

import torch

from pipeline.cache.layout import INT8_MAX, OutputFormat, topk_index_dtype


def encode_logits(logits: torch.Tensor, fmt: OutputFormat) -> dict[str, torch.Tensor]:
    """float logits [N,C] → the stored columns: `logits` fp16, or `topk_values` fp16 / `topk_index` / `tail_logit`
    float32 (the fill logit that spreads the exact tail mass at τ = 1 over the other classes)."""
    if fmt.logits == "fp16":
        return {"logits": logits.to(torch.float16)}
    z = logits.to(torch.float64)
    c = z.shape[1]
    k = min(fmt.topk, c - 1)
    values, index = z.topk(k, dim=1, sorted=False)
    m = z.max(1, keepdim=True).values
    lse = m[:, 0] + (z - m).exp().sum(1).log()
    top_mass = (values - lse[:, None]).exp().sum(1)
    tail_mass = (1.0 - top_mass).clamp_min(1e-30)
    fill = (tail_mass / (c - k)).log() + lse
    index_dtype = torch.int16 if topk_index_dtype(c).__name__ == "int16" else torch.int32
    return {
        "topk_values": values.to(torch.float16),
        "topk_index": index.to(index_dtype),
        "tail_logit": fill.to(torch.float32),
    }


def encode_features(fmap: torch.Tensor, fmt: OutputFormat) -> dict[str, torch.Tensor]:
    """A feature map [N,C,H,W] → `feat` fp16, or `feat` int8 and `feat_scale` fp16 [N,C]: a per-sample,
    per-channel scale from the float16 map's peaks, rounded up to the next float16, as `cache.quantize_int8`."""
    half = fmap.to(torch.float16)
    if fmt.features == "fp16":
        return {"feat": half}
    n, c = half.shape[:2]
    peak = half.reshape(n, c, -1).abs().amax(-1).to(torch.float32)
    scale = (peak / INT8_MAX * (1 + 2.0**-9)).to(torch.float16)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    q = half.to(torch.float32) / scale.to(torch.float32)[:, :, None, None]
    q = q.round().clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return {"feat": q, "feat_scale": scale}


def not_finite(*tensors: torch.Tensor) -> torch.Tensor:
    """A device bool: does any of `tensors` (as stored: float16 overflows beyond 65504) hold inf or NaN?

    One reduction per tensor and no temporary of its size: the sum in a wider type is finite exactly when every
    value is (float16 values summed in float32, or float32 ones in float64, cannot overflow short of ~1e33
    values)."""
    bad = torch.zeros((), dtype=torch.bool, device=tensors[0].device)
    for t in tensors:
        if t.is_floating_point():
            wide = torch.float32 if t.dtype == torch.float16 else torch.float64
            bad = bad | ~torch.isfinite(t.sum(dtype=wide))
    return bad
