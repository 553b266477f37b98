#!/usr/bin/env bash
# One command for a machine with one CUDA GPU, under 5 minutes: WRPO on a toy Llama (hidden 1024,
# 8 layers, bf16, 40 steps of 16 examples) with the plain Trainer and under DeepSpeed ZeRO-3
# (infra/deepspeed/zero3.json, 1 process), each started by the local launcher (torchrun); prints
# step time and tokens/s for both, and fails if their losses differ by more than 0.1 (bf16).
#
#   bench/gpu_zero3.sh                    # needs the CUDA torch build + deepspeed in .venv
#   bench/gpu_zero3.sh --steps 80 --json  # any bench/zero3_cpu.py option
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$HOME/.cache/wrpo-fusion/torch_extensions}"
exec timeout 300 "${PYTHON:-.venv/bin/python}" bench/zero3_cpu.py --gpu "$@"
