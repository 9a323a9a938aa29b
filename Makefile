PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test lint bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: requirements.txt requirements-dev.txt | $(BIN)/python
	$(BIN)/python -m pip install --quiet -r requirements-dev.txt
	touch $@

## demo: build synthetic scenes, export clips, train briefly, evaluate and track (all on the CPU)
demo: $(VENV)/.installed
	$(BIN)/python demo.py --make_demo=True

## test: lint and run the whole test suite
test: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

lint: $(VENV)/.installed
	$(BIN)/ruff check .

bench: $(VENV)/.installed
	$(BIN)/python benchmarks/bench_model.py

clean:
	rm -rf $(VENV) demo_out .pytest_cache .ruff_cache
