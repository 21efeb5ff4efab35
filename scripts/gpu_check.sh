#!/usr/bin/env bash
# The prepared GPU check (one GPU is enough; about 5 minutes, 15 with the serving bench):
#   1. the demo config on the GPU: 2 rollout actors, the evaluator and 1 learner rank sharing it through a
#      colocated placement group, bf16 base weights and factors, the sharded low-rank learner layer, NCCL;
#   2. bench/gpu_check.py: SVD / recompose / generation / learner-step throughput on a random ~1B Llama;
#   3. bench/rollout_engines.py on the GPU: HF (today's path and shared prefix) vs the vLLM engine
#      (bf16 base, fp32 z, z-only updates), SmolLM2 on ARC-Easy prompts and the toy (needs `vllm`: setup.sh);
#   4. bench/lora_rank.py --speed on the GPU: vLLM output tokens/s of SmolLM2 as the base, a merged expert, and
#      the expert as a LoRA adapter at K = 512, 128, 32 (all and MLP-only LoRA modules), same prompts, one run;
#   5. bench/serve.py on the GPU: t2dist serve (Ray Serve) under load, serve.mode exact and lora (needs `vllm`).
#
#   bash scripts/gpu_check.sh [extra t2dist train overrides, e.g. rl.steps=20]
# Writes everything under $OUT (default /tmp/t2dist-gpu-check) and prints the numbers.
set -uo pipefail   # no -e: a failed step is reported and the next one still runs
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PY:-.venv/bin/python}"
[[ -x "$PY" ]] || PY=python
OUT="${OUT:-/tmp/t2dist-gpu-check}"
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 RAY_AUTH_MODE="${RAY_AUTH_MODE:-disabled}" RAY_USAGE_STATS_ENABLED=0
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || { echo "no NVIDIA GPU here" >&2; exit 1; }
"$PY" -c "import torch, deepspeed, ray; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| deepspeed', deepspeed.__version__, '| ray', ray.__version__)"

echo "== 1. demo config on the GPU"
t0=$(date +%s)
timeout "${DEMO_TIMEOUT:-420}" "$PY" -m t2dist train --config configs/demo.yaml \
    model.device=cuda model.dtype=bfloat16 \
    rollout.actors=2 rollout.gpus_per_actor=0.25 train.evaluator_gpus=0.25 \
    learner.ranks=1 learner.gpus_per_rank=0.25 learner.shard_factors=true learner.factor_dtype=bfloat16 \
    ray.address=local ray.placement=colocated \
    "run_dir=$OUT/demo-$t0" "svf.cache_dir=$OUT/factors" "registry.url=$OUT/registry" "$@" 2>&1 | tee "$OUT/demo.log"
rc1=$?
echo "demo wall: $(( $(date +%s) - t0 )) s, rc=$rc1"
cat "$OUT/demo-$t0/summary.json" 2>/dev/null || echo "no summary.json: the demo failed (log: $OUT/demo.log)"

echo "== 2. throughput on a random ~1B Llama (hidden 2048, 16 layers, MLP 5632)"
timeout "${BENCH_TIMEOUT:-300}" "$PY" bench/gpu_check.py 2>&1 | tee "$OUT/gpu_check.md"
rc2=$?

echo "== 3. rollout engines on the GPU (HF vs HF shared prefix vs vLLM; bf16 base, fp32 z)"
if "$PY" -c "import vllm" 2>/dev/null; then
  timeout "${ENGINES_TIMEOUT:-600}" "$PY" bench/rollout_engines.py --device cuda --dtype bfloat16 \
      --cache-dir "$OUT/factors-engines" --json "$OUT/rollout_engines.json" 2>&1 | tee "$OUT/rollout_engines.md"
  rc3=$?
else
  echo "vllm is not installed here (bash scripts/setup.sh installs it): skipping the engine bench"
fi

echo "== 4. an expert as a LoRA adapter in vLLM (SmolLM2, arith prompts): base vs merged vs LoRA K=512/128/32"
if "$PY" -c "import vllm" 2>/dev/null; then
  timeout "${LORA_TIMEOUT:-600}" "$PY" bench/lora_rank.py --speed --run configs/smollm2-arith.yaml random \
      --ops stock --mlp-only --prompts 64 --max-tokens 64 --set model.device=cuda model.dtype=bfloat16 \
      "svf.cache_dir=$OUT/factors-lora" --json "$OUT/lora_speed.json" 2>&1 | tee "$OUT/lora_speed.md"
  rc4=$?
else
  echo "vllm is not installed here: skipping the LoRA speed table"
fi
echo "== 5. t2dist serve under load on the GPU (bench/serve.py: exact and lora modes, SmolLM2 on mixed_real)"
if "$PY" -c "import vllm" 2>/dev/null; then
  timeout "${SERVE_TIMEOUT:-1500}" "$PY" bench/serve.py --json "$OUT/serve.json" --model smollm2 --n "${SERVE_N:-96}" \
      --modes exact,lora model.device=cuda model.dtype=bfloat16 serve.gpus_per_replica=0.4 \
      rollout.vllm.gpu_memory_utilization=0.3 ray.address=local "svf.cache_dir=$OUT/factors-serve" 2>&1 | tee "$OUT/serve.md"
  rc5=$?
else
  echo "vllm is not installed here: skipping the serving bench"
fi
echo "== exit codes: demo ${rc1} | throughput ${rc2} | engines ${rc3:-skipped} | lora speed ${rc4:-skipped} | serve ${rc5:-skipped}"
(( rc1 == 0 && rc2 == 0 && ${rc3:-0} == 0 && ${rc4:-0} == 0 && ${rc5:-0} == 0 ))
