# `make demo` and `make test` each set up their own virtual environment (.venv) on first use.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin

$(VENV)/.installed: pyproject.toml setup.cfg setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0  # the CPU build; an unpinned torch pulls a CUDA build
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

.PHONY: install demo test lint test-compiled clean-compiled
install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(BIN)/specmd demo

lint: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# pytest-xdist: one worker per CPU. --dist loadfile keeps each test file on one worker, so a module-scoped fixture
# (an lm_eval run, a trained model, the session's Ray cluster) is built once, not once per worker.
PYTEST_PARALLEL ?= -n auto --dist loadfile

test: lint
	$(BIN)/python -m pytest $(PYTEST_PARALLEL)

# The same suite against the engine compiled with mypyc (setup.py, SPECMD_COMPILE=1), built in place and removed
# afterwards so the checkout runs its .py files again. mypyc's shared runtime module lands at the checkout's root
# (a wheel puts it in site-packages), so PYTHONPATH lets the console script's subprocesses import it too.
# Tests marked `launch` are left out here: they start a launcher or script in subprocesses (the stock lm_eval
# script, accelerate's two ranks, `specmd demo`, the training script, a peak-RSS probe), whose engine work the
# in-process tests already run compiled, so they would repeat the pure run's checks (`make test` runs them; CI
# runs both). The Ray sweeps stay: shipping a trace to Ray's workers pickles it, which the compiled engine
# changes (specmd/sim/sweep_ray.py).
# mypy as pyproject.toml's [build-system] pins it (a build compiles the engine where it can; see README)
MYPY_VERSION ?= 2.4.1
# (the trap runs the removal itself: a `$(MAKE)` in the recipe line would make `make -n` run the line for real)
CLEAN_COMPILED = find specmd -name '*.so' -delete; rm -f ./*__mypyc.*.so; rm -rf build
test-compiled: $(VENV)/.installed
	$(BIN)/python -m pip install --quiet mypy==$(MYPY_VERSION)
	trap "$(CLEAN_COMPILED)" EXIT; \
	SPECMD_COMPILE=1 $(BIN)/python setup.py --quiet build_ext --inplace && \
	SPECMD_EXPECT_COMPILED=1 PYTHONPATH=$(CURDIR) $(BIN)/python -m pytest $(PYTEST_PARALLEL) -m 'not launch'

clean-compiled:
	$(CLEAN_COMPILED)
