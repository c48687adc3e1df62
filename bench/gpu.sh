#!/usr/bin/env bash
# The GPU checks in one run, for a session that has the GPU machine (see README "Benchmarks"):
#   bash bench/gpu.sh [STEP ...]             # on the GPU: results under $OUT (or bench/results/)
#   bash bench/gpu.sh --smoke [STEP ...]     # the same steps on the CPU, small (Triton in its interpreter)
# Steps, in this order by default (the decoder first: the largest gap):
#   attention  the Triton paged attention compiled, against SDPA (bf16 and 7B shapes included), and the Triton
#              rotary + K/V cache write against the CPU path
#   gemv       tune the one-token Triton GEMV against cuBLAS on every served projection shape (~1 min); the table
#              comes back as $out/gemv_configs-*.json (to be committed as services/common/gemv_configs.json), and
#              the decoder step after it runs with it (GEMV_CONFIGS)
#   decoder    the engine against transformers' generate at InternLM2.5-7B shapes: 1/16/64 streams, 13-tile TTFT,
#              decode steps at 64 x 1,024-token prompts by sampling settings against greedy ones (~20 s);
#              the profile times each step with and without overlap; then fp32 at 0.5B shapes, whose greedy tokens
#              must equal transformers' (the bench fails otherwise)
#   vision     InternViT-300M + the 8B projector against transformers': tiles/s at 64 tiles, a 13-tile image, one
#              tile; eager, CUDA graphs and torch.compile
#   vision6b   InternViT-6B (InternVL-Chat-V1-5) the same way, eager and torch.compile (the service's default;
#              not run by default: ~2 min eager alone on an H200, run it when the other steps have left the time)
#   awq        tune the AWQ W4A16 paths (a few Triton configs per shape and token bucket, and torch's int4
#              kernel, ~3-4 min), then bench the tuned table against dense fp16; the table comes back as
#              $out/awq_configs-*.json, to be committed as services/llm_decoder/models/awq_configs.json
#   awq_engine with that table (AWQ_CONFIGS, when the awq step wrote it to the same $OUT), the whole InternVL2_5-4B LLM
#              (Qwen2.5-3B shapes) AWQ (fp16, as served) against bf16 through the engine, 1 and 16 streams
#              (~1 min), and AWQ in bf16 at 1 stream
#   stack      InternVL2_5-8B at real shapes through the services with Redis: time to first token on a miss and on
#              a cache hit, split by phase (bench.families; not run by default). Needs what the machine lacks, as
#              wheels: run `bash bench/device_wheels.sh` here first and carry `.whl` and `internvl`
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-bench/results}"
day="$(date +%F)"
export PYTHONUNBUFFERED=1
py="${PYTHON:-python3}"  # the GPU machine has python3 (the one with torch), not always python
smoke=0
if [[ "${1:-}" == "--smoke" ]]; then smoke=1; shift; fi
steps=("$@")
[[ ${#steps[@]} -gt 0 ]] || steps=(attention gemv decoder vision awq awq_engine)
gemv_table="$out/gemv_configs-$([[ $smoke == 1 ]] && echo smoke || echo h200)-$day.json"
[[ -f "$gemv_table" ]] && export GEMV_CONFIGS="$gemv_table"  # tuned by an earlier call of this session
awq_table="$out/awq_configs-$([[ $smoke == 1 ]] && echo smoke || echo h200)-$day.json"
[[ -f "$awq_table" ]] && export AWQ_CONFIGS="$awq_table"  # tuned by the awq step (awq_engine runs with it)
for step in "${steps[@]}"; do
  echo "== $step"
  case "$step:$smoke" in
    attention:1) TRITON_INTERPRET=1 "$py" -m tests.triton_attention_check cpu
                 TRITON_INTERPRET=1 "$py" -m tests.triton_rotary_check cpu ;;
    attention:0) "$py" -m tests.triton_attention_check cuda
                 "$py" -m tests.triton_rotary_check cuda ;;
    gemv:1) TRITON_INTERPRET=1 "$py" -m bench.gemv --smoke --tune "$gemv_table" --out "$out/gemv-smoke-$day.md" ;;
    gemv:0) "$py" -m bench.gemv --tune "$gemv_table" --out "$out/gemv-h200-$day.md"
            export GEMV_CONFIGS="$gemv_table" ;;
    decoder:1) "$py" -m bench.decoder --device cpu --smoke --no-stack --profile 1 --trace-compiles \
                 --out "$out/decoder-smoke-$day.md" ;;
    decoder:0) "$py" -m bench.decoder --device cuda --shape internlm2_5_7b --dtype bfloat16 --profile 1 64 \
                 --trace-compiles --out "$out/decoder-h200-$day.md"
               # fp32 at 0.5B shapes: greedy tokens must equal transformers' (the GPU path's correctness, ~40 s)
               "$py" -m bench.decoder --device cuda --shape qwen2_5_0_5b --dtype float32 --streams 1 16 \
                 --new-tokens 32 --prompt-len 64 --ttft-tiles 1 --ttft-streams 1 --ttft-shared 2 --ttft-repeat 1 \
                 --no-stack --out "$out/decoder-h200-fp32-$day.md" ;;
    vision:1) "$py" -m bench.vision --device cpu --smoke --out "$out/vision-smoke-$day.md" ;;
    vision:0) "$py" -m bench.vision --device cuda --out "$out/vision-h200-$day.md" ;;
    vision6b:1) "$py" -m bench.vision --device cpu --smoke --family internvl-chat-v1_5 \
                  --out "$out/vision6b-smoke-$day.md" ;;
    vision6b:0) "$py" -m bench.vision --device cuda --family internvl-chat-v1_5 --variants eager compile \
                  --out "$out/vision6b-h200-$day.md" ;;
    awq:1) TRITON_INTERPRET=1 "$py" -m bench.awq --smoke --tune "$awq_table"
           export AWQ_CONFIGS="$awq_table" ;;
    awq:0) "$py" -m bench.awq --tune "$awq_table" --out "$out/awq-h200-$day.md"
           export AWQ_CONFIGS="$awq_table" ;;
    awq_engine:1) "$py" -m bench.awq_engine --device cpu --smoke --out "$out/awq-engine-smoke-$day.md" ;;
    awq_engine:0) "$py" -m bench.awq_engine --device cuda --out "$out/awq-engine-h200-$day.md"
                  # AWQ in bf16: torch's int4 kernel (bf16 only) without the casts fp16 costs it, one stream
                  "$py" -m bench.awq_engine --device cuda --streams 1 --awq-dtype bfloat16 \
                    --out "$out/awq-engine-bf16-h200-$day.md" ;;
    stack:1) "$py" -m bench.families --size tiny --device cpu --families internvl2_5-8b \
               --out "$out/families-smoke-$day.md" ;;
    stack:0) (if [[ -d .whl ]]; then  # in a subshell: the wheels shadow nothing for the other steps
                "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
                  .whl/*.whl
                export PYTHONPATH=/tmp/site
              fi
              # the gateway's C resize for this Python (the checkout carries none); Pillow's resize if it cannot build
              "$py" setup.py -q build_ext --inplace \
                || echo "gpu.sh: services/gateway/_resample.c did not build; the gateway resizes with Pillow" >&2
              "$py" -m bench.families --device cuda --families internvl2_5-8b --out "$out/families-h200-$day.md") ;;
    *) echo "unknown step $step (attention, gemv, decoder, vision, awq, awq_engine, vision6b, stack)" >&2; exit 2 ;;
  esac
done
