# Two entry points for a fresh machine: `make demo` (main job) and `make test` (the test suite).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The release pinned here is the one this project is tested with. On a machine with an NVIDIA
# driver pip picks the normal CUDA build; set TORCH_SPEC / TORCH_INDEX_URL to choose another.
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX_URL ?=
PYTEST_ARGS ?=

.PHONY: setup demo demo-long demo-ablation demo-long-ablation demo-large demo-large-ablation demo-big demo-big-ablation demo-trail demo-trail-ablation test bench clean

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
for package in ("model", "infer", "train", "synth"):
    for module in pkgutil.walk_packages(importlib.import_module(package).__path__, package + "."):
        if not module.name.endswith("__main__"):
            importlib.import_module(module.name)
endef
export WARM_IMPORTS

# The main job: the shapes world end to end on CPU. synth build makes exact (source, edited) pairs
# (the demo's mix, and recolour clips alone for the first 200 steps; the temporal layers train from
# step 700: configs/shapes-curriculum.yaml),
# lightning fit trains a pixel-space editor from scratch, synth.demo edits held-out clips and
# writes outputs/demo/metrics.json and outputs/demo/samples.png.
DEMO_SAMPLES ?= 4000
RECOLOUR_SAMPLES ?= 2000
# The held-out clips follow the shards' own synth config (frames, size, speeds, radii, edits).
WORLD = --world configs/synth/shapes.yaml
# $(call shards,SYNTH_CONFIG,OUT[,CLIPS]): a world's clips as shards; --resume keeps what an earlier
# (or interrupted) run wrote, so every target builds the shards it reads and none builds them twice.
shards = $(VENV)/bin/synth build --config $(1) --out $(2) --num-samples $(or $(3),$(DEMO_SAMPLES)) --resume
DEMO_SHARDS = $(call shards,configs/synth/shapes.yaml,outputs/demo/shards)
RECOLOUR_SHARDS = $(call shards,configs/synth/shapes-recolour.yaml,outputs/demo/recolour-shards,$(RECOLOUR_SAMPLES))
# make demo's training recipe: the shapes recipe with its curriculum layered over it
CURRICULUM = --config configs/shapes.yaml --config configs/shapes-curriculum.yaml
demo: setup
	$(DEMO_SHARDS)
	$(RECOLOUR_SHARDS)
	$(VENV)/bin/lightning fit $(CURRICULUM)
	$(VENV)/bin/python -m synth.demo $(WORLD) --editor outputs/demo/editor --out outputs/demo --no-one-step

# 64 held-out clips of the moving-shape edit alone, the one edit a single frame cannot settle (a
# 64-clip mix holds about a quarter of them): its ratio and which-shape score, video against 2D.
ONE_KIND = --no-one-step --long-clips 0 --picture '' --quiet
MOVING_ONLY = $(VENV)/bin/python -m synth.demo --edits recolor_moving $(ONE_KIND)
# a 2D ablation's report on the mix, beside its video editor's metrics.json
ABLATION_REPORT = --report ablation.json --no-one-step --long-clips 0 --picture ablation.png

# make demo's recipe (curriculum, late temporal layers) trained 4,000 steps instead of 900; writes
# outputs/demo-long/metrics.json (and moving.json).
LONG = $(CURRICULUM) --config configs/shapes-long.yaml
demo-long: setup
	$(DEMO_SHARDS)
	$(RECOLOUR_SHARDS)
	$(VENV)/bin/lightning fit $(LONG)
	$(VENV)/bin/python -m synth.demo $(WORLD) --editor outputs/demo-long/editor --out outputs/demo-long
	$(MOVING_ONLY) $(WORLD) --editor outputs/demo-long/editor --out outputs/demo-long --report moving.json

# The temporal ablation: the same recipe and sampler with the motion modules frozen at their
# zero-initialised output (a per-frame 2D editor); writes outputs/demo/ablation.json.
demo-ablation: setup
	$(DEMO_SHARDS)
	$(RECOLOUR_SHARDS)
	$(VENV)/bin/lightning fit $(CURRICULUM) --config configs/shapes-ablation.yaml
	$(VENV)/bin/python -m synth.demo $(WORLD) --editor outputs/demo-ablation/editor --out outputs/demo \
		$(ABLATION_REPORT)

# The temporal ablation of demo-long: its 4,000-step recipe with the motion modules frozen at zero
# output; writes outputs/demo-long/ablation.json and ablation-moving.json beside demo-long's
# metrics.json and moving.json.
demo-long-ablation: setup
	$(DEMO_SHARDS)
	$(RECOLOUR_SHARDS)
	$(VENV)/bin/lightning fit $(LONG) \
		--config configs/shapes-ablation.yaml --trainer.default_root_dir outputs/demo-long-ablation/train \
		--model.export_dir outputs/demo-long-ablation/editor
	$(VENV)/bin/python -m synth.demo $(WORLD) --editor outputs/demo-long-ablation/editor --out outputs/demo-long \
		$(ABLATION_REPORT)
	$(MOVING_ONLY) $(WORLD) --editor outputs/demo-long-ablation/editor --out outputs/demo-long --report ablation-moving.json

# 4,000 steps of the mix from the first step (no curriculum) on the larger-shapes world (radius
# 20-30 %), where the temporal ablation is measured on 64 moving-shape clips; writes
# outputs/demo-large/metrics.json and moving.json.
LARGE = --world configs/synth/shapes-large.yaml
demo-large: setup
	$(call shards,configs/synth/shapes-large.yaml,outputs/demo-large/shards)
	$(VENV)/bin/lightning fit --config configs/shapes.yaml --config configs/shapes-long.yaml --config configs/shapes-large.yaml
	$(VENV)/bin/python -m synth.demo --editor outputs/demo-large/editor --out outputs/demo-large $(LARGE)
	$(MOVING_ONLY) --editor outputs/demo-large/editor --out outputs/demo-large --report moving.json $(LARGE)

# Its per-frame 2D ablation; writes outputs/demo-large/ablation.json and ablation-moving.json.
demo-large-ablation: setup
	$(call shards,configs/synth/shapes-large.yaml,outputs/demo-large/shards)
	$(VENV)/bin/lightning fit --config configs/shapes.yaml --config configs/shapes-long.yaml --config configs/shapes-large.yaml \
		--config configs/shapes-ablation.yaml --trainer.default_root_dir outputs/demo-large-ablation/train \
		--model.export_dir outputs/demo-large-ablation/editor
	$(VENV)/bin/python -m synth.demo --editor outputs/demo-large-ablation/editor --out outputs/demo-large $(LARGE) \
		$(ABLATION_REPORT)
	$(MOVING_ONLY) --editor outputs/demo-large-ablation/editor --out outputs/demo-large --report ablation-moving.json $(LARGE)

# demo-long's recipe for 6,000 steps on the big-shapes world (radius 25-35 %, each scene's shapes in a
# fresh draw order), with 800 steps of swaps of one big shape a scene after the recolour phase, kept
# in the mix after it (configs/shapes-big.yaml): the run where the new shape's name is read; writes
# outputs/demo-big/metrics.json, swap.json and moving.json.
BIG = --world configs/synth/shapes-big.yaml
BIG_SHARDS = $(call shards,configs/synth/shapes-big.yaml,outputs/demo-big/shards) && \
	$(call shards,configs/synth/shapes-big-recolour.yaml,outputs/demo-big/recolour-shards,$(RECOLOUR_SAMPLES)) && \
	$(call shards,configs/synth/shapes-big-swap.yaml,outputs/demo-big/swap-shards,$(RECOLOUR_SAMPLES))
demo-big: setup
	$(BIG_SHARDS)
	$(VENV)/bin/lightning fit $(LONG) --config configs/shapes-big.yaml
	$(VENV)/bin/python -m synth.demo $(BIG) --editor outputs/demo-big/editor --out outputs/demo-big
	$(VENV)/bin/python -m synth.demo $(BIG) --edits swap $(ONE_KIND) --editor outputs/demo-big/editor \
		--out outputs/demo-big --report swap.json
	$(MOVING_ONLY) $(BIG) --editor outputs/demo-big/editor --out outputs/demo-big --report moving.json

# Its per-frame 2D ablation; writes outputs/demo-big/ablation.json and ablation-moving.json.
demo-big-ablation: setup
	$(BIG_SHARDS)
	$(VENV)/bin/lightning fit $(LONG) --config configs/shapes-big.yaml \
		--config configs/shapes-ablation.yaml --trainer.default_root_dir outputs/demo-big-ablation/train \
		--model.export_dir outputs/demo-big-ablation/editor
	$(VENV)/bin/python -m synth.demo $(BIG) --editor outputs/demo-big-ablation/editor --out outputs/demo-big \
		$(ABLATION_REPORT)
	$(MOVING_ONLY) $(BIG) --editor outputs/demo-big-ablation/editor --out outputs/demo-big --report ablation-moving.json

# The path world (configs/synth/shapes-trail.yaml): "leave a trail behind the moving shape" beside
# background edits, the demo's recipe on whole 8-frame clips; writes outputs/demo-trail/metrics.json.
TRAIL = --world configs/synth/shapes-trail.yaml --no-one-step --long-clips 0
demo-trail: setup
	$(call shards,configs/synth/shapes-trail.yaml,outputs/demo-trail/shards)
	$(VENV)/bin/lightning fit --config configs/shapes.yaml --config configs/shapes-trail.yaml
	$(VENV)/bin/python -m synth.demo $(TRAIL) --editor outputs/demo-trail/editor --out outputs/demo-trail

# Its per-frame 2D ablation; writes outputs/demo-trail/ablation.json.
demo-trail-ablation: setup
	$(call shards,configs/synth/shapes-trail.yaml,outputs/demo-trail/shards)
	$(VENV)/bin/lightning fit --config configs/shapes.yaml --config configs/shapes-trail.yaml \
		--config configs/shapes-ablation.yaml --trainer.default_root_dir outputs/demo-trail-ablation/train \
		--model.export_dir outputs/demo-trail-ablation/editor
	$(VENV)/bin/python -m synth.demo $(TRAIL) --editor outputs/demo-trail-ablation/editor --out outputs/demo-trail \
		--report ablation.json --picture ablation.png

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: setup
	$(PY) bench/model.py
	$(PY) bench/infer.py
	$(PY) bench/train.py
	$(PY) bench/synth.py

clean:
	rm -rf $(VENV) outputs .pytest_cache
