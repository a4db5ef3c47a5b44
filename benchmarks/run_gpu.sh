#!/usr/bin/env bash
# Everything the GPU host runs, in one go: the random-weight model, the benchmark, the GPU tests.
#   usage: benchmarks/run_gpu.sh OUT [SECONDS] [RUNS]
#   OUT: results folder; SECONDS: time budget for the whole script (default 3000); RUNS: gpu_bench.py --runs
#   GPU_TESTS=0 skips the GPU tests; DPO=1 also runs benchmarks/dpo_gpu.py (needs RUNS, which makes the model); EXPORT_8B=1 times the 8B export (merge, f16 GGUF, q4_k_m), each verified on one prompt
#   PROFILE=SETTING (a gpu_bench.py setting of sftlib, e.g. sftlib:auto-15GiB) also profiles it after the benchmark,
#   which leaves PROFILE_SECONDS (default 240) for it
# Needs torch with CUDA, transformers, peft, TRL, bitsandbytes and (for two contenders) unsloth installed;
# EXPORT_8B also llama-cpp-python (the wheel `python -m sftlib gguf-setup` builds) and its dependency diskcache.
set -uo pipefail
out=${1:?usage: run_gpu.sh OUT [SECONDS] [RUNS]}
budget=${2:-3000}
runs=${3:-}
tests=${GPU_TESTS:-1}
start=$SECONDS
mkdir -p "$out"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv
left() { echo $(( budget - (SECONDS - start) )); }

if [ "$tests" = 1 ]; then
  mkdir -p /tmp/gpu-tests
  timeout $(( $(left) - 30 )) python3 benchmarks/gpu_tests_report.py --out /tmp/gpu-tests --timeout 900
  cp /tmp/gpu-tests/gpu_tests.md "$out/" 2>/dev/null
  tar -czf "$out/gpu_tests.tgz" -C /tmp gpu-tests
  echo "gpu tests done at $((SECONDS - start))s"
fi

if [ "${EXPORT_8B:-0}" = 1 ]; then
  python3 benchmarks/make_model.py --out /tmp/llama-8b
  echo "8B model written at $((SECONDS - start))s"
  timeout $(( $(left) - 20 )) python3 benchmarks/export_bench.py --base /tmp/llama-8b --template llama-3 \
    --pre-tokenizer auto --formats merged_16bit,gguf:f16,gguf:q4_k_m --prompts 1 --max-new-tokens 16 \
    --out "$out/export_8b" --work /tmp/export-8b
  echo "8B export done at $((SECONDS - start))s"
  rm -rf /tmp/export-8b
fi

reserve=0
[ -n "${PROFILE:-}" ] && reserve=${PROFILE_SECONDS:-240}  # kept for the profile out of the benchmark's time
if [ -n "$runs" ] || [ -n "${PROFILE:-}" ]; then
  [ -d /tmp/llama-8b-bnb-4bit ] || python3 benchmarks/make_model.py --out /tmp/llama-8b --quantize
  echo "model ready at $((SECONDS - start))s"
fi
if [ -n "$runs" ]; then
  python3 benchmarks/gpu_bench.py --model /tmp/llama-8b-bnb-4bit --out "$out/bench" --runs "$runs" \
    --deadline $(( $(left) - 15 - reserve )) --timeout 300
  if [ "${DPO:-0}" = 1 ]; then
    timeout $(( $(left) - 15 )) python3 benchmarks/dpo_gpu.py --model /tmp/llama-8b-bnb-4bit --out "$out/dpo" \
      --timeout 600
    echo "DPO benchmark done at $((SECONDS - start))s"
  fi
fi
if [ -n "${PROFILE:-}" ]; then
  timeout $(( $(left) - 10 )) python3 benchmarks/profile_8b.py --model /tmp/llama-8b-bnb-4bit --out "$out/profile" \
    --setting "$PROFILE"
  echo "profile done at $((SECONDS - start))s"
fi
echo "all done at $((SECONDS - start))s"
