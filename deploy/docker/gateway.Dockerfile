# syntax=docker/dockerfile:1
# Gateway image: CPU only, no torch. Build context = the repository root:
#   docker build --file deploy/docker/gateway.Dockerfile --tag internvl-serving-gateway:dev .

# ---- builder: venv with the runtime dependencies + the generated gRPC stubs -----------------------------------------
FROM python:3.11.13-slim-bookworm AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

# Binary wheels only. The one thing compiled is the gateway's own C extension (services/gateway/_resample.c, Pillow's
# bicubic resize vectorised): gcc lives in this stage only, the final stage gets the built module with services/.
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
COPY deploy/docker/gateway-requirements.txt deploy/docker/build-requirements.txt /tmp/req/
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir --only-binary=:all: -r /tmp/req/gateway-requirements.txt \
 && /opt/venv/bin/pip uninstall --yes pip \
 && python -m venv /opt/codegen \
 && /opt/codegen/bin/pip install --no-cache-dir --only-binary=:all: -r /tmp/req/build-requirements.txt

# The stubs are generated here (grpcio-tools stays in the throw-away /opt/codegen venv), as `make proto` does, and the
# extension built in place, as `pip install -e .` does: by setup.py alone, with the setuptools a 3.11 venv comes with
# (build_ext needs none of pyproject.toml's metadata, which that setuptools cannot read), for the final stage's Python.
WORKDIR /app
COPY proto/ proto/
COPY services/ services/
COPY setup.py ./
RUN /opt/codegen/bin/python -m grpc_tools.protoc -Iproto --python_out=. --pyi_out=. --grpc_python_out=. \
        proto/internvl/serving/v1/serving.proto \
 && /opt/codegen/bin/python setup.py -q build_ext --inplace \
 && /opt/venv/bin/python -c "from services.gateway import _resample" \
 && /opt/venv/bin/python -m compileall -q services internvl

# ---- final: the venv, services/ and internvl/ only -------------------------------------------------------------------
FROM python:3.11.13-slim-bookworm

ARG VERSION=0.1.0
ARG VCS_REF=unknown
ARG SOURCE_URL=""
LABEL org.opencontainers.image.title="internvl-serving-gateway" \
      org.opencontainers.image.description="InternVL serving gateway: OpenAI-compatible REST and public gRPC API (CPU, no torch)" \
      org.opencontainers.image.source="${SOURCE_URL}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${VCS_REF}"

# The Helm chart runs with a read-only root filesystem and emptyDirs at /tmp and /cache: everything the process writes
# (HOME, the Hugging Face hub cache with the tokenizer and config) goes there. /cache is created here too so that a
# plain `docker run` works without the mounts. Weights are never baked in: MODEL names a hub id or a mounted path.
ENV PATH=/opt/venv/bin:$PATH \
    GLIBC_TUNABLES=glibc.malloc.hugetlb=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    XDG_CACHE_HOME=/cache \
    HF_HOME=/cache/huggingface

RUN mkdir -p /cache && chown 10001:10001 /cache

WORKDIR /app
COPY --from=builder /opt/venv /opt/venv
COPY --from=builder /app/services /app/services
COPY --from=builder /app/internvl /app/internvl

USER 10001:10001
# REST (--port), public gRPC (--grpc-port); the gateway has no separate metrics port.
EXPOSE 8000 50050
ENTRYPOINT ["python", "-m", "services.gateway"]
