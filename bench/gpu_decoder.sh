#!/usr/bin/env bash
# The decoder engine's GPU checks in one run, for a session that has the GPU machine (see README "Benchmarks"):
#   bash bench/gpu_decoder.sh            # on the GPU: results under $OUT (or bench/results/)
#   bash bench/gpu_decoder.sh --smoke    # the same steps on the CPU, small (Triton in its interpreter)
# 1. the Triton paged attention compiled, against SDPA (bf16 and 7B shapes included);
# 2. the engine against transformers' generate at InternLM2.5-7B shapes: 1/16/64 streams, a 13-tile prompt's TTFT.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-bench/results}"
day="$(date +%F)"
export PYTHONUNBUFFERED=1
py="${PYTHON:-python3}"  # the GPU machine has python3 (the one with torch), not always python
if [[ "${1:-}" == "--smoke" ]]; then
  TRITON_INTERPRET=1 "$py" -m tests.triton_attention_check cpu
  "$py" -m bench.decoder --device cpu --smoke --no-stack --out "$out/decoder-smoke-$day.md"
else
  "$py" -m tests.triton_attention_check cuda
  "$py" -m bench.decoder --device cuda --shape internlm2_5_7b --dtype bfloat16 --out "$out/decoder-h200-$day.md"
fi
