# Two entry points for a fresh clone: `make main` (the main job) and `make test` (the full test suite).
# Both create .venv and install torch==2.13.0 first (a CPU build; a looser spec would pull a CUDA build).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.pl-actsparse-installed
KERNELS := $(VENV)/.pl-actsparse-kernels

.PHONY: main test bench venv kernels clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# The C++ CPU kernels, built once per environment ahead of time, so that neither the tests nor the main job
# pay for it (without a compiler this step reports why and the pure-PyTorch fallback is used).
kernels: $(KERNELS)

$(KERNELS): $(STAMP) $(wildcard pl_actsparse/kernels/csrc/*.cpp)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/pl-actsparse build-kernels --allow-failure
	touch $(KERNELS)

main: $(KERNELS)
	$(VENV)/bin/pl-actsparse validate --config recipes/stories260k_training_free.yaml

# PL_ACTSPARSE_BUILD_EXT=1: the tests also check the C++ kernels (built by the kernels step; without a
# compiler those tests are skipped and the pure-PyTorch fallback is tested alone).
test: $(KERNELS)
	PL_ACTSPARSE_BUILD_EXT=1 PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/calibration.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
