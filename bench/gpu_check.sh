#!/usr/bin/env bash
# The GPU check in ONE command (< 8 minutes on one H200): HF and vLLM sampling tokens/s, batched vs
# batch-1 reward scoring, plain vs ZeRO-3 WRPO (step time, tokens/s, MFU, peak memory); prints one
# Markdown table for bench/RESULTS.md and exits 1 if any stage fails (bench/gpu_check.py says how).
#
# Needs, besides this working tree:
#   - one CUDA GPU and a python3 (3.12) with a CUDA build of torch; the lent H200 machine has torch
#     2.11, transformers 5.17, accelerate, huggingface-hub, tokenizers, safetensors, pyarrow, fsspec,
#     numpy, pyyaml, tqdm, regex, psutil, ninja, einops, msgpack, py-cpuinfo, nvidia-ml-py;
#   - what it lacks, as wheels in .whl/ (built HERE by bench/gpu_check_wheels.sh, pinned to
#     requirements/gpu-training.txt): transformers 5.20.2, deepspeed (+ hjson), pydantic (+ core,
#     annotated-types, typing-inspection, typing-extensions), datasets (+ dill, multiprocess), regex;
#     with the device tool, name `.whl` in `carry` if git ignores it.
#   - nothing from the network: models are random-weight Llamas built in the run. vLLM is not
#     carried (too large): its row then says "vllm not importable: ...".
# Without .whl/ it runs .venv/bin/python if there is one, else python3 as they are.
#
#   bench/gpu_check.sh                            # the check (no CUDA is a failure)
#   bench/gpu_check.sh --json "$OUT/check.json"   # also the report as JSON
#   bench/gpu_check.sh --cpu-smoke                # the same code paths on the CPU, toy size
set -uo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$HOME/.cache/wrpo-fusion/torch_extensions}"
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || { echo "gpu_check: FAILED to install the wheels in .whl/" >&2; exit 1; }
    export PYTHONPATH="/tmp/site:$PWD"
    PYTHON=python3
elif [ -x .venv/bin/python ]; then
    PYTHON=.venv/bin/python
else
    PYTHON=python3
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
# The driver keeps to a 450 s budget and prints the partial table when stopped; SIGKILL 20 s later.
exec timeout -k 20 470 "$PYTHON" bench/gpu_check.py "$@"
