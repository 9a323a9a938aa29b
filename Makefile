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

# optional extras (ONNX export check); the test suite uses them
$(VENV)/.installed-onnx: requirements-onnx.txt $(VENV)/.installed
	$(BIN)/python -m pip install --quiet -r requirements-onnx.txt
	touch $@

## demo: synthetic scenes -> parallel mp4 export -> short training -> test_on_pod vs zero-velocity -> demo.py
demo: $(VENV)/.installed
	$(BIN)/python benchmarks/learning_check.py --out=demo_out --quick=True --max_iters=30 --train_scenes=3 --test_scenes=1
	$(BIN)/python demo.py --init_dir=$$(ls -d demo_out/checkpoints/*/ | head -n 1) --S=16 --iters=4 --grid_size=8 \
		--out_dir=demo_out/track
	@echo "demo done: see demo_out/track/tracks.mp4, tracks.csv, tracks.npz"

## test: lint and run the whole test suite
test: $(VENV)/.installed $(VENV)/.installed-onnx
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

lint: $(VENV)/.installed
	$(BIN)/ruff check .

bench: $(VENV)/.installed
	$(BIN)/python benchmarks/bench_model.py

clean:
	rm -rf $(VENV) demo_out .pytest_cache .ruff_cache
