# syntax=docker/dockerfile:1
# LLM decoder image (GPU). Build context = the repository root:
#   docker build --file deploy/docker/llm_decoder.Dockerfile --tag internvl-serving-llm_decoder:dev .
#
# Base: the CUDA "base" image (driver hooks, NVIDIA_* variables for the container toolkit, cudart). The CUDA libraries
# torch links against (cuBLAS, cuDNN, NCCL, ...) come as pip wheels with torch 2.13.0 (CUDA 13.0), so a -runtime or
# -cudnn-runtime base would only carry a second copy. CUDA 13 needs an NVIDIA driver >= 580 on the node.

# ---- builder: Python 3.11, venv with the runtime dependencies, generated gRPC stubs ----------------------------------
FROM nvidia/cuda:13.0.0-base-ubuntu22.04 AS builder

ARG DEBIAN_FRONTEND=noninteractive
# Python 3.11 from the deadsnakes PPA (Ubuntu 22.04's own python3 is 3.10; the project needs >= 3.11).
RUN apt-get update \
 && apt-get install -y --no-install-recommends software-properties-common gpg-agent \
 && add-apt-repository -y ppa:deadsnakes/ppa \
 && apt-get update \
 && apt-get install -y --no-install-recommends python3.11 python3.11-venv \
 && rm -rf /var/lib/apt/lists/*

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

# Binary wheels only: nothing is compiled. torch==2.13.0 from PyPI is the CUDA 13.0 build (see gpu-requirements.txt).
COPY deploy/docker/gpu-requirements.txt deploy/docker/build-requirements.txt /tmp/req/
RUN python3.11 -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir --only-binary=:all: -r /tmp/req/gpu-requirements.txt \
 && /opt/venv/bin/pip uninstall --yes pip \
 && python3.11 -m venv /opt/codegen \
 && /opt/codegen/bin/pip install --no-cache-dir --only-binary=:all: -r /tmp/req/build-requirements.txt

WORKDIR /app
COPY proto/ proto/
COPY services/ services/
RUN /opt/codegen/bin/python -m grpc_tools.protoc -Iproto --python_out=. --pyi_out=. --grpc_python_out=. \
        proto/internvl/serving/v1/serving.proto \
 && /opt/venv/bin/python -m compileall -q services internvl

# ---- final: Python 3.11 runtime + the venv, services/ and internvl/ -------------------------------------------------
FROM nvidia/cuda:13.0.0-base-ubuntu22.04

ARG VERSION=0.1.0
ARG VCS_REF=unknown
ARG SOURCE_URL=""
LABEL org.opencontainers.image.title="internvl-serving-llm_decoder" \
      org.opencontainers.image.description="InternVL serving LLM decoder pool: continuous batching, paged KV cache, streaming over gRPC (CUDA)" \
      org.opencontainers.image.source="${SOURCE_URL}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${VCS_REF}"

ARG DEBIAN_FRONTEND=noninteractive
# The deadsnakes source and key the builder set up, so that only the interpreter is installed here (no
# software-properties-common): python3.11 (the venv's interpreter) and CA certificates for hub downloads.
# gcc, libc6-dev and python3.11-dev are RUNTIME dependencies of this image, not build tools: on the first kernel launch
# Triton (the paged-attention and AWQ kernels) compiles its CUDA driver shim (triton/backends/nvidia/driver.c, which
# includes Python.h) with the C compiler it finds on PATH, and fails with "Failed to find C compiler" without one.
# No g++, make or build-essential.
COPY --from=builder /etc/apt/sources.list.d/ /etc/apt/sources.list.d/
COPY --from=builder /etc/apt/trusted.gpg.d/ /etc/apt/trusted.gpg.d/
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3.11 ca-certificates gcc libc6-dev python3.11-dev \
 && rm -rf /var/lib/apt/lists/* \
 && mkdir -p /cache \
 && chown 10001:10001 /cache

# The Helm chart runs with a read-only root filesystem and emptyDirs at /tmp and /cache: HOME, the hub cache (the
# weights downloaded at start-up when MODEL is a hub id), Triton's and the CUDA driver's JIT caches all live there.
# Weights are never baked in: MODEL names a hub id or a mounted path.
ENV PATH=/opt/venv/bin:$PATH \
    GLIBC_TUNABLES=glibc.malloc.hugetlb=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    XDG_CACHE_HOME=/cache \
    HF_HOME=/cache/huggingface \
    TRITON_CACHE_DIR=/cache/triton \
    TORCHINDUCTOR_CACHE_DIR=/cache/torchinductor \
    CUDA_CACHE_PATH=/cache/nv

WORKDIR /app
COPY --from=builder /opt/venv /opt/venv
COPY --from=builder /app/services /app/services
COPY --from=builder /app/internvl /app/internvl

USER 10001:10001
# gRPC (--port), Prometheus /metrics (--metrics-port).
EXPOSE 50052 9102
ENTRYPOINT ["python", "-m", "services.llm_decoder"]
