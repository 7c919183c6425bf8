# Two entry points for a fresh machine: `make demo` (main job) and `make test` (the test suite).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The release pinned here is the one this project is tested with. On a machine with an NVIDIA
# driver pip picks the normal CUDA build; set TORCH_SPEC / TORCH_INDEX_URL to choose another.
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX_URL ?=
PYTEST_ARGS ?=

.PHONY: setup demo demo-ablation experiment test test-cpu-paths bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --no-compile $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL)) "$(TORCH_SPEC)"
	$(PY) -m pip install -q --no-compile -e ".[test]"
	env -u PYTHONDONTWRITEBYTECODE $(PY) -c "$$WARM_IMPORTS"
	touch $@

# pip would byte-compile every file it installs (all of torch: half of set-up's time); instead the
# modules the project and its tests import are compiled once, by importing them.
define WARM_IMPORTS
import importlib, pkgutil, pytest
for package in ("model", "infer", "shards", "train", "synth"):
    for module in pkgutil.walk_packages(importlib.import_module(package).__path__, package + "."):
        if not module.name.endswith("__main__"):
            importlib.import_module(module.name)
endef
export WARM_IMPORTS

# The main job: the shapes world end to end on CPU (python -m synth.experiments --list shows every
# recorded experiment; configs/experiments/shapes/experiments.yaml says what each one runs).
# synth build makes exact (source, edited) pairs, lightning fit trains a pixel-space editor from
# scratch, synth.demo edits held-out clips and writes outputs/demo/metrics.json and samples.png.
demo: setup
	$(PY) -m synth.experiments demo

# The temporal ablation: the same recipe and sampler with the temporal layers never trained (a
# per-frame 2D editor); writes outputs/demo/ablation.json.
demo-ablation: setup
	$(PY) -m synth.experiments demo --ablation

# Any other recorded experiment: make experiment RECIPE=demo-long [ABLATION=1]
RECIPE ?=
ABLATION ?=
experiment: setup
	$(PY) -m synth.experiments $(RECIPE) $(if $(ABLATION),--ablation)

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

# The tests that compare stored or cross-library outputs, again on another CPU path: PyTorch's
# non-vectorised kernels and one thread, so that an exactness assumption fails here, not on a
# user's machine.
test-cpu-paths: setup
	ATEN_CPU_CAPABILITY=default OMP_NUM_THREADS=1 $(PY) -m pytest -q -m reference $(PYTEST_ARGS)

bench: setup
	$(PY) bench/model.py
	$(PY) bench/infer.py
	$(PY) bench/train.py
	$(PY) bench/synth.py

clean:
	rm -rf $(VENV) outputs .pytest_cache
