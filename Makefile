# The two commands a new user needs: `make quickstart` (set up, then train -> per-task eval ->
# export -> start tritonserver -> gRPC query on the embedded synthetic default) and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip

.PHONY: setup quickstart test test-all peers perf-tools gpu-check serving-gpu-check throughput benchmark

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "torch==2.13.0" "numpy<2"
	# CPU fbgemm first, then torchrec WITHOUT its deps: its metadata asks for the CUDA fbgemm-gpu,
	# which would overwrite the CPU build and break `import torchrec`.
	$(PIP) install -q "fbgemm-gpu-cpu==1.8.0"
	$(PIP) install -q --no-deps "torchrec==1.8.0"
	$(PIP) install -q -e ".[cpu,serving,text,kernels,index,dev]"
	touch $@

setup: $(VENV)/.installed

quickstart: setup
	$(VENV)/bin/unirank quickstart

# Triton reads TRITON_INTERPRET when it is first imported, and torchrec imports triton, so the
# kernel tests' own conftest is too late in a full run: CPU runs set it for the whole session.
# On a GPU machine run `TRITON_INTERPRET=0 make test` to test the compiled kernels.
TRITON_INTERPRET ?= 1
export TRITON_INTERPRET

test: setup
	$(VENV)/bin/pytest -q -m "not slow" tests

test-all: setup
	$(VENV)/bin/pytest -q tests

# On a machine with a GPU: the kernel tests compiled, 200 training steps on CUDA against the CPU,
# samples/s with the kernels on and off (docs/DISTRIBUTED.md, "GPU check").
gpu-check: setup
	TRITON_INTERPRET=0 $(PY) benchmarks/gpu_check.py

# the served graph on ONNX Runtime's CUDA provider: parity with CPU + latency (needs the serving-gpu extra)
serving-gpu-check: setup
	$(PY) benchmarks/serving_gpu_check.py

# samples/s of this tree's trainer beside another revision's, one epoch each (BASELINE=rev)
BASELINE ?= HEAD~1
throughput: setup
	$(PY) benchmarks/train_throughput.py --baseline-rev $(BASELINE)

# Peers for `unirank benchmark --peers` and benchmarks/quality.py (rectools SASRec / BERT4Rec) in their own venv, so their
# dependencies (pytorch-lightning, pandas, ...) cannot break ours. torch is pinned first: a plain
# `torch` requirement would pull a multi-GB CUDA build.
PEERS_VENV ?= .venv-peers
$(PEERS_VENV)/.installed:
	$(PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_VENV)/bin/python -m pip install -q --upgrade pip
	$(PEERS_VENV)/bin/python -m pip install -q "torch==2.13.0"
	$(PEERS_VENV)/bin/python -m pip install -q "torch==2.13.0" "rectools[torch]==0.19.0"
	touch $@

peers: $(PEERS_VENV)/.installed

# Triton's own load tool for benchmarks/serving_load.py (setup triton-pa). The PyPI `perf-analyzer`
# is a placeholder; the C++ perf_analyzer ships inside the tritonclient 2.42.0 wheel, linked
# against libb64 (Debian: `apt-get install libb64-0d`) and libcudart (the CUDA runtime wheel; not
# used on a CPU-only machine). Installed as $(VENV)/bin/perf_analyzer, a wrapper that finds libcudart.
PA_WHEEL := tritonclient-2.42.0-py3-none-manylinux1_x86_64.whl
$(VENV)/bin/perf_analyzer: | setup
	@ldconfig -p | grep -q libb64.so.0d || { echo "perf_analyzer needs libb64: apt-get install libb64-0d"; exit 1; }
	$(PIP) install -q "nvidia-cuda-runtime-cu12==12.9.79"
	$(PIP) download -q --no-deps "tritonclient==2.42.0" --platform manylinux1_x86_64 --only-binary=:all: -d $(VENV)/perf-tools
	$(PY) -c "import zipfile, sys; zipfile.ZipFile(sys.argv[1]).extract(sys.argv[2], sys.argv[3])" \
		$(VENV)/perf-tools/$(PA_WHEEL) tritonclient-2.42.0.data/data/bin/perf_analyzer $(VENV)/perf-tools
	chmod +x $(VENV)/perf-tools/tritonclient-2.42.0.data/data/bin/perf_analyzer
	printf '#!/bin/sh\nhere=$$(cd "$$(dirname "$$0")/.." && pwd)\nlib=$$(echo "$$here"/lib/python3*/site-packages/nvidia/cuda_runtime/lib)\nLD_LIBRARY_PATH="$$lib:$$LD_LIBRARY_PATH" exec "$$here/perf-tools/tritonclient-2.42.0.data/data/bin/perf_analyzer" "$$@"\n' > $@
	chmod +x $@

perf-tools: $(VENV)/bin/perf_analyzer

# One recipe over seeds, selected on validation, beside the baselines (docs/RESULTS.md):
# make benchmark DATA=../shared/data/ml-latest-small CONFIG=fast SEEDS=3 REPORT=docs/bench/leaderboards/leaderboard_ml-latest-small
DATA   ?= ../shared/data/amazon-beauty
CONFIG ?= fast
SEEDS  ?= 3
REPORT ?= runs/benchmark/benchmark
RUNS   ?= runs/benchmark/$(notdir $(REPORT))
benchmark: setup
	$(VENV)/bin/unirank benchmark --data $(DATA) --config $(CONFIG) --seeds $(SEEDS) --out $(RUNS) --report $(REPORT)
