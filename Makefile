# The two commands a new user needs: `make quickstart` (set up, then train -> per-task eval ->
# export -> start tritonserver -> gRPC query on the embedded synthetic default) and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip

.PHONY: setup quickstart test test-all

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "torch==2.13.0" "numpy<2"
	# CPU fbgemm first, then torchrec WITHOUT its deps: its metadata asks for the CUDA fbgemm-gpu,
	# which would overwrite the CPU build and break `import torchrec`.
	$(PIP) install -q "fbgemm-gpu-cpu==1.8.0"
	$(PIP) install -q --no-deps "torchrec==1.8.0"
	$(PIP) install -q -e ".[cpu,serving,text,kernels,dev]"
	touch $@

setup: $(VENV)/.installed

quickstart: setup
	$(VENV)/bin/unirank quickstart

test: setup
	$(PY) -m pytest -q -m "not slow" tests

test-all: setup
	$(PY) -m pytest -q tests
