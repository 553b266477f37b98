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

.PHONY: venv demo serve test test-fast lint format bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -c $(CONSTRAINTS) -e ".[$(EXTRAS)]"
	touch $(STAMP)

demo: venv  ## the whole pipeline offline on the toy world, through the Prefect flow (see README)
	$(BIN)/python -m flows.demo --out runs/demo

serve: venv  ## local Prefect server + process worker + the deployments (Ctrl-C twice stops them)
	VENV_BIN=$(BIN) deployments/serve.sh

test: venv  ## every test, unit and integration
	$(BIN)/python -m pytest -q

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
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
