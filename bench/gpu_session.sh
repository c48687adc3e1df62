#!/usr/bin/env bash
# The GPU checks as one call of a lent machine (device time is short and each start costs a minute): gpu.sh's steps,
# each under its own time limit so one that hangs leaves the others their time, every result packed into one archive
# after each step (the device tool returns at most 8 files, and what a call killed at its limit left under $OUT).
#   bash bench/gpu_session.sh STEP:SECONDS ...     e.g. awq:300 awq_engine:150 decoder:140 (a call may run 600 s)
#   bash bench/gpu_session.sh --smoke STEP:SECONDS ...   the same on the CPU (gpu.sh --smoke)
# Results: $OUT/gpu-results.tgz (unpack into bench/results/ and name the files by commit, see the README); each
# step's log is in it, and its last lines are printed.
set -uo pipefail
cd "$(dirname "$0")/.."
[[ -n "${OUT:-}" ]] || { echo "gpu_session.sh: set OUT to the folder that comes back" >&2; exit 2; }
smoke=()
if [[ "${1:-}" == "--smoke" ]]; then smoke=(--smoke); shift; fi
mkdir -p "$OUT"
results="$(mktemp -d)"
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  "${PYTHON:-python3}" -c "import torch, transformers, triton
print(torch.__version__, transformers.__version__, triton.__version__)"
} > "$results/env.txt" 2>&1
cat "$results/env.txt"
for spec in "$@"; do
  step="${spec%%:*}" limit="${spec#*:}"
  echo "== $step (limit ${limit} s) $(date +%T)"
  OUT="$results" timeout -k 5 "$limit" bash bench/gpu.sh "${smoke[@]}" "$step" > "$results/$step.log" 2>&1
  echo "rc=$? $(date +%T)"
  tail -n 12 "$results/$step.log" | cut -c1-200
  tar czf "$OUT/gpu-results.tgz" -C "$results" .
done
