# syntax=docker/dockerfile:1
# SAMPLING image for the GPU nodes: the sample and score stages' Ray actors (vLLM's offline engine, Hugging
# Face reward models) and the Ray 2.60 head/workers that run them. Exactly requirements/gpu-sampling.txt
# (vllm 0.33.0, torch 2.14.0 for CUDA 13.0, transformers 5.20.2, ray[default] 2.60.0) + this package,
# on Python 3.12.
#
#   docker build -f infra/sampling.Dockerfile -t $REGISTRY/wrpo-fusion-sampling:0.1.0 .   # repository root
#
# Base: CUDA 13.0, torch's CUDA major.minor; torch loads the CUDA libraries of its nvidia-* wheels, so the
# host needs only a driver for CUDA 13.0 (>= 580). A *devel* base, not a runtime one: the lock has no prebuilt
# FlashInfer kernels (flashinfer-cubin / flashinfer-jit-cache), so vLLM's FlashInfer kernels are JIT-built
# with nvcc on first use, and Triton compiles its launchers with gcc against Python.h (vLLM's own image adds
# nvcc to its runtime stage for the same reason). Ubuntu 24.04's python3 is 3.12, the Python the locks were
# resolved for. The tag was chosen, not pulled: the machine this file was written on has no Docker engine,
# so the image has not been built yet (see infra/README.md).
# Everything down to the lock's COPY is the same in training.Dockerfile, so the two images share those layers.
FROM nvidia/cuda:13.0.3-devel-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive LANG=C.UTF-8 LC_ALL=C.UTF-8
# Python 3.12 with its headers and a C/C++ compiler (the JIT builds of DeepSpeed, Triton, FlashInfer),
# and what Ray's launchers expect in a node image: rsync and ssh (`ray up` copies files in, the head
# reaches the workers over ssh) and wget (KubeRay's readiness and liveness probes).
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        python3.12 python3.12-dev build-essential rsync openssh-client wget ca-certificates \
    && rm -rf /var/lib/apt/lists/*
# A non-root user `ray` with uid 1000, as in Ray's own images (files that `ray up` copies from the host's
# uid-1000 user stay readable); Ubuntu's image gives uid 1000 to `ubuntu`, which makes way.
RUN if id ubuntu >/dev/null 2>&1; then userdel ubuntu && rm -rf /home/ubuntu; fi \
    && useradd --create-home --uid 1000 --gid users --shell /bin/bash ray

COPY --from=ghcr.io/astral-sh/uv:0.13.9 /uv /usr/local/bin/uv
ENV VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH \
    UV_PYTHON_DOWNLOADS=never UV_LINK_MODE=copy UV_COMPILE_BYTECODE=1
RUN uv venv --python /usr/bin/python3.12 /opt/venv

# Dependency layer: only the lock, so editing the source does not reinstall the stack. --no-deps: the lock
# is complete, the image holds exactly its pins; `uv pip check` fails the build if it is not.
# nvidia-cutlass-dsl-libs-cu13 is reinstalled last: it shares paths with -libs-base/-libs-cu12 and must win
# whatever order they were unpacked in (CuTe DSL's CUDA 13 JIT; vLLM's Dockerfile does the same).
COPY requirements/gpu-sampling.txt /tmp/gpu-sampling.txt
RUN --mount=type=cache,target=/root/.cache/uv \
    uv pip install --python /opt/venv/bin/python --no-deps -r /tmp/gpu-sampling.txt \
    && if grep -q '^nvidia-cutlass-dsl-libs-cu13==' /tmp/gpu-sampling.txt; then \
        grep '^nvidia-cutlass-dsl-libs-cu13==' /tmp/gpu-sampling.txt > /tmp/cutlass-cu13.txt \
        && uv pip install --python /opt/venv/bin/python --no-deps --reinstall -r /tmp/cutlass-cu13.txt; \
    fi \
    && uv pip check --python /opt/venv/bin/python

# This package (setuptools, from the lock: --no-build-isolation downloads nothing, --no-deps changes nothing).
COPY pyproject.toml README.md /tmp/wrpo-fusion/
COPY wrpo_core /tmp/wrpo-fusion/wrpo_core
COPY tasks /tmp/wrpo-fusion/tasks
COPY flows /tmp/wrpo-fusion/flows
RUN uv pip install --python /opt/venv/bin/python --no-deps --no-build-isolation /tmp/wrpo-fusion \
    && uv pip check --python /opt/venv/bin/python \
    && rm -rf /tmp/wrpo-fusion

USER ray
WORKDIR /home/ray
# Model and tokenizer downloads and the JIT caches (vLLM, FlashInfer, Triton) live under HOME (mount a
# volume there to keep them).
ENV HOME=/home/ray \
    HF_HOME=/home/ray/.cache/huggingface \
    TORCH_EXTENSIONS_DIR=/home/ray/.cache/torch_extensions \
    OMP_NUM_THREADS=8 \
    TOKENIZERS_PARALLELISM=false
RUN mkdir -p "$HF_HOME" "$TORCH_EXTENSIONS_DIR"
