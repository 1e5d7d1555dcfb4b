# Every target creates the virtual environment it needs. PyTorch is installed
# first at the pinned pair, which this machine's pip serves from local disk.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH_PIN := torch==2.14.1 torchvision==0.29.1

CIFAR_JPEG := ../shared/data/cifar10-jpeg.tar.gz
ifneq ($(wildcard $(CIFAR_JPEG)),)
DATA_ARGS := --dataset imagefolder --data-dir $(CIFAR_JPEG)
else
DATA_ARGS := --dataset cifar10 --data-dir data --download
endif

.PHONY: setup test run plots bench-check bench-save clean-cache

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_PIN)
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

setup: $(VENV)/.installed

# The test command of the README.
test: setup
	$(PY) -m pytest -q

# The main job of the README.
run: setup
	$(VENV)/bin/splitrpc-train --config bench/configs/main.toml $(DATA_ARGS) --out results/main.jsonl

# Figures, plots/summary.md and the generated pages of docs/ (options.md, results/) from the
# code and the committed raw results; the committed ones must come out unchanged.
plots: setup
	$(PY) -m plots

# Regression checks that carry across machines (bench/check.py): what the engine adds over
# a reference measured in the same run (split or DDP step / local step, prefetch / none,
# RPC / plain TCP round trip), against bench/baseline/baseline.json with tolerances from
# the spread of 5 runs; absolute medians only against a baseline saved on the same CPU.
bench-check: setup
	$(PY) -m bench.check

# Save both after a change that is meant to alter the engine's speed, or on a new CPU
# (adds that CPU's absolute medians beside the others); on a quiet machine (~10 min).
bench-save: setup
	$(PY) -m bench.check --save

clean-cache:
	rm -rf .cache
