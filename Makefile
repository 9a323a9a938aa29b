PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

# pyright (basic mode, pyproject's [tool.pyright]) as pinned in requirements-dev.txt; without the warning about a
# newer release the wrapper asks PyPI for, so it needs no network
PYRIGHT := PYRIGHT_PYTHON_IGNORE_WARNINGS=1 $(BIN)/pyright

.PHONY: demo test lint bench clean golden-matrix diff-matrix

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: requirements.txt requirements-dev.txt pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -r requirements-dev.txt
	$(BIN)/python -m pip install --quiet --no-deps -e .
	touch $@

# optional extras (ONNX export check); the test suite uses them
$(VENV)/.installed-onnx: requirements-onnx.txt $(VENV)/.installed
	$(BIN)/python -m pip install --quiet -r requirements-onnx.txt
	touch $@

## demo: synthetic scenes -> parallel mp4 export -> short training -> test_on_pod vs zero-velocity -> demo.py
demo: $(VENV)/.installed
	$(BIN)/python benchmarks/learning_check.py --out=demo_out --quick=True --max_iters=120 --iters=3 --lr=1e-3 --train_scenes=4 \
		--test_scenes=2 --crop_size=128,128
	$(BIN)/python demo.py --init_dir=$$(ls -td demo_out/checkpoints/*/ | head -n 1) --S=16 --iters=3 --grid_size=8 \
		--out_dir=demo_out/track
	@echo "demo done: see demo_out/track/tracks.mp4, tracks.csv, tracks.npz"

## test: lint, the type check, the float tests under four more thread/kernel settings, then the whole test suite (the fifth)
test: $(VENV)/.installed $(VENV)/.installed-onnx
	$(BIN)/ruff check .
	$(PYRIGHT)
	$(MAKE) --no-print-directory golden-matrix GOLDEN_MATRIX="$(wordlist 2,$(words $(GOLDEN_SETTINGS)),$(GOLDEN_SETTINGS))"
	OMP_NUM_THREADS=1 DIFF_EVERY=$(DIFF_EVERY) $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --durations=25

# the whole suite in TEST_WORKERS processes (pytest-xdist), one thread each: two processes of two threads each
# on two cores spent most of their time waiting on each other (docs/CORRECTNESS.md, "Test suite")
TEST_WORKERS ?= 2
# OMP_NUM_THREADS:ATEN_CPU_CAPABILITY (empty = the CPU's own kernels). See docs/CORRECTNESS.md.
GOLDEN_SETTINGS := 1: 2:avx2 2:default 1:default 2:
GOLDEN_TESTS := tests/test_golden.py tests/test_lbm.py
# the settings golden-matrix runs; make test leaves out the first, which its whole suite runs with every plan
GOLDEN_MATRIX ?= $(GOLDEN_SETTINGS)
# tests/test_diff_authors.py in make test's whole suite: the PIPs++ cases of every DIFF_EVERY-th video (8: the
# first video's 15 cases) and every DIFF_EVERY-th LBM case; make diff-matrix (CI runs it after make test) runs
# every stored case under the five settings
DIFF_EVERY ?= 8

## golden-matrix: the tests that compare floats, once per thread count and kernel set
golden-matrix: $(VENV)/.installed
	@for s in $(GOLDEN_MATRIX); do t=$${s%%:*}; c=$${s#*:}; \
	  echo "== float tests with OMP_NUM_THREADS=$$t ATEN_CPU_CAPABILITY=$${c:-<native>}"; \
	  env OMP_NUM_THREADS=$$t $${c:+ATEN_CPU_CAPABILITY=$$c} GOLDEN_PLANS=default,reference,training \
	    $(BIN)/python -m pytest -q -p no:cacheprovider $(GOLDEN_TESTS) || exit 1; \
	done

## diff-matrix: every stored differential case against the authors (docs/CORRECTNESS.md), five settings
diff-matrix: $(VENV)/.installed
	@for s in $(GOLDEN_SETTINGS); do t=$${s%%:*}; c=$${s#*:}; \
	  echo "== differential cases with OMP_NUM_THREADS=$$t ATEN_CPU_CAPABILITY=$${c:-<native>}"; \
	  env OMP_NUM_THREADS=$$t $${c:+ATEN_CPU_CAPABILITY=$$c} DIFF_EVERY=1 $(BIN)/python -m pytest -q \
	    -p no:cacheprovider --durations=5 tests/test_diff_authors.py || exit 1; \
	done

lint: $(VENV)/.installed
	$(BIN)/ruff check .
	$(PYRIGHT)

bench: $(VENV)/.installed
	$(BIN)/python benchmarks/bench_model.py

clean:
	rm -rf $(VENV) demo_out .pytest_cache .ruff_cache
