# Set-up and the two main commands. `make demo` and `make test` create .venv and install
# everything on a fresh machine. GPU users: see README ("Installing on GPU machines").
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
CONSTRAINTS ?= requirements/constraints-cpu.txt
EXTRAS ?= dev,s3,orchestration,deepspeed
STAMP := $(VENV)/.installed

export OMP_NUM_THREADS ?= 1
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export RAY_AUTH_MODE ?= disabled

.PHONY: venv venv-gpu-locks demo serve test test-gpu-locks test-fast lint format bench locks clean

venv: $(STAMP)

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -c $(CONSTRAINTS) -e ".[$(EXTRAS)]"
	touch $(STAMP)

# The GPU locks' pure-Python versions with the CPU torch: CI's second test pass (README, "GPU stack").
LOCK_VENV := .venv-gpu-locks
GPU_LOCK := requirements/gpu-training.txt
GPU_LOCK_PURE := transformers tokenizers huggingface-hub safetensors accelerate trl deepspeed datasets
STACK_TESTS := tests/test_trainers.py tests/test_training_recipe.py tests/test_trl_parity.py \
	tests/test_wrpo_precision.py tests/test_deepspeed.py tests/test_objectives.py tests/test_reference_cache.py \
	tests/test_job_fingerprint.py tests/test_tokenization.py tests/test_toy_tokenizer.py \
	tests/test_model_families.py tests/test_sampling.py tests/test_length_stopped.py tests/test_rewards.py tests/test_armorm_compat.py \
	tests/test_gpu_stack.py tests/test_packing.py tests/test_sampling_rng.py

venv-gpu-locks: $(LOCK_VENV)/.installed

$(LOCK_VENV)/.installed: pyproject.toml $(CONSTRAINTS) $(GPU_LOCK)
	test -x $(LOCK_VENV)/bin/python || $(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/pip install --quiet --upgrade pip
	$(LOCK_VENV)/bin/pip install --quiet "$(TORCH_SPEC)"
	$(PYTHON) requirements/lock_pins.py overlay $(CONSTRAINTS) $(GPU_LOCK) $(GPU_LOCK_PURE) > $(LOCK_VENV)/constraints.txt
	$(LOCK_VENV)/bin/pip install --quiet -c $(LOCK_VENV)/constraints.txt -e ".[$(EXTRAS)]"
	touch $@

demo: venv  ## the whole pipeline offline on the toy world, through the Prefect flow (see README)
	$(BIN)/python -m flows.demo --out runs/demo

serve: venv  ## local Prefect server + process worker + the deployments (Ctrl-C twice stops them)
	VENV_BIN=$(BIN) deployments/serve.sh

test: venv  ## every test, unit and integration
	$(BIN)/python -m pytest -q

test-gpu-locks: venv-gpu-locks  ## unit tests of training, tokenization, sampling, rewards under the GPU locks' versions
	$(LOCK_VENV)/bin/python -m pytest -q -m "not integration" -p no:cacheprovider $(STACK_TESTS)

locks: venv  ## re-resolve requirements/gpu-*.txt from their .in files (needs the package index)
	$(BIN)/pip install --quiet "uv>=0.13"
	for stack in sampling training; do $(BIN)/uv pip compile requirements/gpu-$$stack.in --python-version 3.12 \
	  --python-platform x86_64-manylinux_2_39 --no-header --annotation-style line -q -o requirements/gpu-$$stack.txt; done

test-fast: venv  ## unit tests only
	$(BIN)/python -m pytest -q -m "not integration"

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: venv
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: venv
	$(BIN)/python bench/reference_logps.py

clean:
	rm -rf $(VENV) $(LOCK_VENV) runs .pytest_cache .ruff_cache
