#!/usr/bin/env bash
# The GPU checks, in priority order, for a GPU machine (one GPU), inside one time budget. It needs torch, pyarrow,
# pydantic, xxhash, PyYAML and Ray importable (on an offline machine: `pip install --no-index --target /tmp/site`
# from carried wheels, then PYTHONPATH=/tmp/site:$PWD); without Ray the Ray steps fail and the others still run.
#
#   BUDGET=500 OUT=./gpu-out bash benchmarks/gpu_session.sh
#
#   1. ray_b256: the real loop through Ray Train + Ray Data on one GPU (NCCL process group: every collective on the
#      device) and the Ray path ÷ in-memory ratio, batch 256, cached CA-MKD (3 × resnet32x4 → resnet8x4), with
#      cached ÷ CE and cached ÷ online in memory
#   2. in-memory at batch 64; 3. channels_last and 4. bf16 autocast at batch 256
#   5. the whole training step (forward, loss, backward, optimizer) compiled as one graph and replayed as a CUDA
#      graph (torch.compile mode="reduce-overhead", as `--opts cudagraphs`), CE and cached CA-MKD, batch 64
#   6. precompute on the GPU: 3 teachers in one pass, bf16, the plain loop and the Ray pipeline; 6b. a torch.profiler
#      trace of the teacher actor (do its copies to and from the GPU overlap compute? $OUT/profile.tgz, actor/)
#   7. train.compile (the whole step as one graph) at batch 256, 8. the same with channels_last,
#   9. the CUDA-graph variant at batch 256
#   10. host_cost (after 1): the training process's CPU per 1,000 samples outside the step with the GPU's pinned
#      staging and copies (benchmarks/host_cost.py --device cuda)
# STEPS=ray_b256,precompute_bf16 runs only the steps named; RAY_VARIANTS=compile,pin_off adds Ray-path CA-MKD runs
# with those config changes (benchmarks/train_throughput.py --ray-variants); PROFILE=1 profiles 20 steps of epoch 2
# of each Ray-path run (torch.profiler tables and traces, $OUT/profile.tgz); PRECOMPUTE_IMAGES sizes step 5.
# Each step's output goes to $OUT/session.log and its last line (one JSON object) to $OUT/results.jsonl; a step
# that fails does not stop the next; a step that would not finish inside BUDGET seconds is cut or skipped.
set -u
OUT="${OUT:-./gpu-out}"
BUDGET="${BUDGET:-500}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
deadline=$(($(date +%s) + BUDGET))
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >"$OUT/gpu.txt" 2>&1
python3 -c 'import torch, ray; print("torch", torch.__version__, "ray", ray.__version__)' >>"$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"
step() { # name, timeout, command...
  local name=$1 limit=$2 left rc start
  shift 2
  [[ -z "${STEPS:-}" || ",$STEPS," == *",$name,"* ]] || return 0
  left=$((deadline - $(date +%s) - 5))
  ((left < limit)) && limit=$left
  if ((limit < 20)); then
    echo "=== $name: skipped (budget spent)" | tee -a "$OUT/session.log"
    echo "{\"step\": \"$name\", \"skipped\": true}" >>"$OUT/results.jsonl"
    return
  fi
  echo "=== $name (limit ${limit}s): $*" | tee -a "$OUT/session.log"
  start=$(date +%s)
  timeout "$limit" "$@" >"$OUT/$name.tmp" 2>&1
  rc=$?
  cat "$OUT/$name.tmp" >>"$OUT/session.log"
  echo "=== $name: rc $rc in $(($(date +%s) - start)) s" | tee -a "$OUT/session.log"
  if ((rc == 0)); then
    printf '{"step": "%s", "seconds": %d, "result": %s}\n' "$name" $(($(date +%s) - start)) \
      "$(tail -n 1 "$OUT/$name.tmp")" >>"$OUT/results.jsonl"
  else
    printf '{"step": "%s", "rc": %d}\n' "$name" "$rc" >>"$OUT/results.jsonl"
    tail -n 25 "$OUT/$name.tmp"
  fi
  rm -f "$OUT/$name.tmp"
}
tt="python3 benchmarks/train_throughput.py --device cuda --threads 8"
step ray_b256 240 $tt --batch 256 --steps 20 --rounds 3 --ray-images 32768 --ray-epochs 4 \
  --ray-variants "${RAY_VARIANTS:-}" ${PROFILE:+--profile-dir /tmp/camkd-profile}
step host_cost 90 python3 benchmarks/host_cost.py --device cuda --scenarios ac --shuffle 0
step inmem_b64 60 $tt --batch 64 --steps 40 --rounds 3 --skip-ray
step inmem_b256_channels_last 50 $tt --batch 256 --steps 20 --rounds 3 --skip-ray --modes ce,cached \
  --opts channels_last
step inmem_b256_bf16 50 $tt --batch 256 --steps 20 --rounds 3 --skip-ray --amp bf16
step inmem_b64_cudagraphs 200 $tt --batch 64 --steps 40 --rounds 3 --skip-ray --modes ce,cached --opts cudagraphs
step precompute_bf16 150 python3 benchmarks/precompute.py --device cuda --precision bf16 --images "${PRECOMPUTE_IMAGES:-16384}" \
  --batch 512 --rows-per-part 1024 --threads 8
step actor_trace 120 python3 benchmarks/actor_trace.py --device cuda --precision bf16 --rows 2048 --batch 512 \
  --trace-dir /tmp/camkd-profile/actor
step inmem_b256_compile 150 $tt --batch 256 --steps 20 --rounds 3 --skip-ray --modes ce,cached --opts compile
step inmem_b256_compile_channels_last 150 $tt --batch 256 --steps 20 --rounds 3 --skip-ray --modes ce,cached \
  --opts compile,channels_last
step inmem_b256_cudagraphs 200 $tt --batch 256 --steps 20 --rounds 3 --skip-ray --modes ce,cached --opts cudagraphs
[[ -d /tmp/camkd-profile ]] && tar czf "$OUT/profile.tgz" -C /tmp camkd-profile
cat "$OUT/results.jsonl"
