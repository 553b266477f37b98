# syntax=docker/dockerfile:1
# FLOW image: the pod of a `wrpo-fusion/kubernetes` flow run (deployments/prefect.yaml, work pool
# wrpo-kubernetes). It orchestrates: Prefect 3.9, the Ray client that hands sampling and scoring to a Ray
# cluster of the sampling image and training to one of the training image, s3fs, and this package with a
# CPU torch. The CPU stack's versions: requirements/constraints-cpu.txt (the same Ray 2.60.0 as the GPU locks).
#
#   docker build -f infra/flow.Dockerfile -t $REGISTRY/wrpo-fusion-flow:0.1.0 .   # repository root
#
# Python 3.12 from Ubuntu 24.04, the GPU images' Python: a Ray client must run the cluster's Python minor
# version or Ray refuses the connection. Not built yet (no Docker engine where this was written).
# For a flow pod that runs GPU stages itself (job variable gpu_count > 0: evaluation, inline sampling),
# build with a CUDA torch: --build-arg TORCH_INDEX_URL=https://pypi.org/simple (PyPI's Linux torch wheel
# carries CUDA; the host then needs a driver for it).
FROM ubuntu:24.04

ENV DEBIAN_FRONTEND=noninteractive LANG=C.UTF-8 LC_ALL=C.UTF-8
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.12 ca-certificates \
    && rm -rf /var/lib/apt/lists/*
RUN if id ubuntu >/dev/null 2>&1; then userdel ubuntu && rm -rf /home/ubuntu; fi \
    && useradd --create-home --uid 1000 --gid users --shell /bin/bash wrpo

COPY --from=ghcr.io/astral-sh/uv:0.13.9 /uv /usr/local/bin/uv
ENV VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH \
    UV_PYTHON_DOWNLOADS=never UV_LINK_MODE=copy UV_COMPILE_BYTECODE=1
RUN uv venv --python /usr/bin/python3.12 /opt/venv

# Dependency layer, below the source: the CPU constraints and pyproject's dependency lists only, so editing
# the source does not reinstall the stack. torch first, alone, from the CPU wheel index (its version from the
# constraints); then the package's dependencies and extras under the constraints (uv reads them from
# pyproject.toml without building it), and setuptools for the package's own build below.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
COPY requirements/constraints-cpu.txt /tmp/constraints-cpu.txt
COPY pyproject.toml /tmp/deps/pyproject.toml
RUN --mount=type=cache,target=/root/.cache/uv \
    uv pip install --python /opt/venv/bin/python --no-deps --index-url "$TORCH_INDEX_URL" \
        "$(grep -E '^torch==' /tmp/constraints-cpu.txt)" \
    && uv pip install --python /opt/venv/bin/python -c /tmp/constraints-cpu.txt \
        -r /tmp/deps/pyproject.toml --extra orchestration --extra s3 "setuptools>=69" \
    && uv pip check --python /opt/venv/bin/python

# This package, kept in /opt/wrpo-fusion: the deployment's pull step runs the flow from there
# (entrypoint flows/fusion.py:fusion). --no-deps: the layer above holds every dependency.
COPY pyproject.toml README.md /opt/wrpo-fusion/
COPY wrpo_core /opt/wrpo-fusion/wrpo_core
COPY tasks /opt/wrpo-fusion/tasks
COPY flows /opt/wrpo-fusion/flows
RUN uv pip install --python /opt/venv/bin/python --no-deps --no-build-isolation /opt/wrpo-fusion \
    && uv pip check --python /opt/venv/bin/python

USER wrpo
WORKDIR /opt/wrpo-fusion
# Model downloads and the toy world's cache live under HOME (the pod's disk: gone with the pod).
ENV HOME=/home/wrpo \
    HF_HOME=/home/wrpo/.cache/huggingface \
    OMP_NUM_THREADS=4 \
    TOKENIZERS_PARALLELISM=false
RUN mkdir -p "$HF_HOME"
