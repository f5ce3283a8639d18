# The two commands of the README: `make demo` and `make test`. Both set up .venv when missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.tessera-installed
STDLIB = $(shell $(PY) -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')
DEMO_DATA := runs/demo-data

GPU_WHEELS := .gpu-wheels

.PHONY: setup demo test lint test-quick bench gpu-wheels gpu-check clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first, pinned: pip takes the local CPU build instead of downloading a CUDA one
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

$(DEMO_DATA)/manifest.json: | $(STAMP)
	$(PY) -m tessera prepare $(STDLIB)/*.py --output $(DEMO_DATA) --train-tokenizer 4096 --shard-bytes 262144 --workers 2

demo: setup $(DEMO_DATA)/manifest.json
	$(PY) -m tessera train --config configs/demo.yaml

# Two pytest workers, a test file to each: most tests wait on processes they start (ranks, a
# Slurm job, a hang timeout), so two keep 2 cores busy (pytest 11-12 min; three workers: 15)
PYTEST := $(PY) -m pytest -q -rs -p no:cacheprovider -n 2 --dist loadfile

test: setup lint
	$(PYTEST)

# pycodestyle, pyflakes and import order at the project's 100 columns (pyproject.toml)
lint: setup
	$(PY) -m ruff check

test-quick: setup
	$(PYTEST) -m "not slow"

# Every benchmark side by side, one table of ratios: bench/results/results.md (and .json)
bench: setup
	$(PY) bench/run_all.py

# For a GPU machine that may be offline with only torch: the wheels it lacks (CPU side, here)
gpu-wheels: setup
	$(PY) bench/gpu_wheels.py --output $(GPU_WHEELS)

# On the GPU machine, with its own python3: every GPU check in one call (no CUDA: exit 2);
# writes bench/results/gpu-<device>.md and .json
gpu-check:
	$(PYTHON) bench/gpu_check.py --wheels $(GPU_WHEELS) $(GPU_CHECK_ARGS)

clean:
	rm -rf runs
