# Two entry points for a fresh machine: `make serve` and `make test`. Each sets itself up.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# CPU build of torch; on a GPU host install the CUDA wheel instead (see README).
TORCH ?= torch==2.13.0
export GENSERVE_CACHE ?= $(HOME)/.cache/genserve
# spinning OpenMP threads make shared or CPU-limited hosts many times slower
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: venv install model serve test lint e2e sync-crds bench clean

$(VENV)/.installed: pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q -e ".[server,gguf,operator,dev]"
	# TGI's own client pins huggingface_hub<1; its code runs fine on 1.x, so install it without deps.
	$(PIP) install -q --no-deps "text-generation==0.7.0"
	touch $@

install: $(VENV)/.installed

model: install
	$(VENV)/bin/genserve prepare-default-model

serve: model
	$(VENV)/bin/genserve serve --port $${PORT:-8080}

test: model
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q $(PYTEST_ARGS)

e2e: install
	$(PY) -m pytest -v e2e

sync-crds: install
	$(PY) scripts/sync_crds.py

bench: model
	$(PY) benchmarks/engine_throughput.py

lint: install
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) build *.egg-info
