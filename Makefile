# X-Pression: `make run` (the whole pipeline on the default synthetic cohort) and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DATA_DIR ?= data
COHORT := $(DATA_DIR)/phantom_default/cohort.yaml
# Each `make run` writes a new folder; nothing earlier is overwritten.
RUN_DIR := runs/make_run/$(shell date +%Y-%m-%d_%H-%M-%S)

.PHONY: run test test-fast cohort install clean-cohort

# (Re)install when the venv is missing or pyproject.toml changed.
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

# The default cohort is deterministic: generated once, reused afterwards.
$(COHORT): | $(STAMP)
	$(PY) -m xpression.phantom --out $(DATA_DIR)/phantom_default --preset default --seed 0

cohort: $(COHORT)

# train.py's default recipe as it is (model=forest: fitted once, swept patch by patch).
run: $(STAMP) $(COHORT)
	$(PY) -m xpression.data.check $(COHORT) --out $(RUN_DIR)/check
	$(PY) train.py hydra.run.dir=$(RUN_DIR)/train
	$(PY) infer.py run=$(RUN_DIR)/train output=$(RUN_DIR)/maps
	@echo "run folder: $(RUN_DIR) (check/: registration overlays; train/: checkpoints, metrics, figures; maps/: OME-Zarr maps, figures, evaluation)"

# The full suite (CI). `make test-fast`: everything but the tests marked slow (whole training runs,
# multiruns, sweeps and CLI runs over 2 s; tests/conftest.py), under 2 minutes on 2 cores. Both
# spread test files over the cores (pytest-xdist; a file's tests stay in one process).
PYTEST_JOBS ?= auto
test: $(STAMP)
	$(PY) -m pytest tests -n $(PYTEST_JOBS) --dist loadfile

test-fast: $(STAMP)
	$(PY) -m pytest tests -m "not slow" -n $(PYTEST_JOBS) --dist loadfile

clean-cohort:
	rm -rf $(DATA_DIR)/phantom_default

# The benchmark: context, backbones and splits, every row scored per volume beside its baselines,
# then runs/benchmark/<date>/benchmark.md (see README "Benchmark"; settings in the script), on the
# benchmark cohort: two animals per condition, recorded planes off by up to 20 um, warped
# sections, expression the CT cannot see (docs/phantom.md). One animal per condition trains.
# BUDGET=cpu (default: a 2-core CPU, under 45 min) or BUDGET=gpu (one GPU, more seeds/epochs/rows).
BUDGET ?= cpu
BENCH_COHORT := $(DATA_DIR)/phantom_benchmark/cohort.yaml
$(BENCH_COHORT): | $(STAMP)
	$(PY) -m xpression.phantom --out $(DATA_DIR)/phantom_benchmark --preset benchmark --seed 0

.PHONY: benchmark
benchmark: $(STAMP) $(BENCH_COHORT)
	PY=$(PY) COHORT=$(BENCH_COHORT) BUDGET=$(BUDGET) benchmarks/run_benchmark.sh
