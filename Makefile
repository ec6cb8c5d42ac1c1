# Two entry points for a fresh machine: `make serve` and `make test`. Each sets itself up.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# Pinned torch. On the project's dev/CI machines pip takes the CPU wheel from local disk; elsewhere
# plain PyPI serves the CUDA build: for a small CPU-only venv use
#   make test TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"
TORCH ?= torch==2.13.0
TORCH_PIP_ARGS ?=
export GENSERVE_CACHE ?= $(HOME)/.cache/genserve
# pytest-xdist workers; each test file runs whole on one worker (module-scoped servers stay shared)
PYTEST_WORKERS ?= 2

.PHONY: venv install model serve test lint e2e sync-crds bench clean prometheus images

$(VENV)/.installed: pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH)" $(TORCH_PIP_ARGS)
	$(PIP) install -q -e ".[server,gguf,operator,bench,dev]"
	# TGI's own client pins huggingface_hub<1; its code runs fine on 1.x, so install it without deps.
	$(PIP) install -q --no-deps "text-generation==0.7.0"
	touch $@

install: $(VENV)/.installed

model: install
	$(VENV)/bin/genserve prepare-default-model

serve: model
	$(VENV)/bin/genserve serve --port $${PORT:-8080}

# Debian's prometheus and promtool for the Prometheus tests, best effort (those tests skip without them)
prometheus:
	@command -v prometheus >/dev/null && command -v promtool >/dev/null \
		|| { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
		     && { apt-get install -y -q --no-install-recommends prometheus >/dev/null 2>&1 \
		          || { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends prometheus >/dev/null; }; }; } \
		|| echo "prometheus not installed: the Prometheus tests will skip"

test: model prometheus
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

# The server (CPU variant) and operator images, with buildah on a debootstrapped Debian base: no Docker
# engine or registry needed (root, buildah, debootstrap). Prints sizes and build times. See docs/delivery.md.
images:
	TORCH="$(TORCH)" TORCH_PIP_ARGS="$(TORCH_PIP_ARGS)" scripts/images/build.sh

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
