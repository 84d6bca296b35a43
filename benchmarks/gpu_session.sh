#!/usr/bin/env bash
# The GPU checks, in priority order, for a lent GPU machine (one GPU, no network, no Ray preinstalled). Run it
# after the Ray wheels are installed (see ../shared/tools/device-ray-wheels; add xxhash, safetensors and PyYAML
# wheels to .whl2 if the machine lacks them) with PYTHONPATH=/tmp/site:$PWD. Each step writes its output and its
# one JSON line under $OUT (default ./gpu-out); a step that fails does not stop the next.
#
#   1. the real loop through Ray Train on one GPU (NCCL process group, every collective on the device) and the
#      Ray path ÷ in-memory ratio, batch 256, cached CA-MKD (3 × resnet32x4 → resnet8x4)
#   2. the same at batch 64, and cached ÷ CE at both batches (in-memory)
#   3. precompute on the GPU: 3 teachers in one pass, fp32 and bf16 (plain loop), then the Ray pipeline
set -u
OUT="${OUT:-./gpu-out}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$OUT/gpu.txt" 2>&1
step() {  # name, command...
  local name=$1
  shift
  echo "=== $name: $*" | tee -a "$OUT/steps.txt"
  if timeout 900 "$@" >"$OUT/$name.log" 2>&1; then echo "ok" >>"$OUT/steps.txt"; else echo "FAILED ($?)" >>"$OUT/steps.txt"; fi
  tail -n 1 "$OUT/$name.log" >"$OUT/$name.json"
}
step ray_b256 python benchmarks/train_throughput.py --device cuda --amp off --batch 256 --rounds 3 \
  --ray-images 16384 --ray-epochs 3 --threads 8
step ray_b64 python benchmarks/train_throughput.py --device cuda --amp off --batch 64 --rounds 3 \
  --ray-images 8192 --ray-epochs 3 --threads 8
step inmem_b256_bf16 python benchmarks/train_throughput.py --device cuda --amp bf16 --batch 256 --skip-ray
step precompute_fp32 python benchmarks/precompute.py --device cuda --precision fp32 --images 16384 --batch 512 --skip-ray
step precompute_bf16 python benchmarks/precompute.py --device cuda --precision bf16 --images 16384 --batch 512 --skip-ray
cat "$OUT/steps.txt"
