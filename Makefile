# Two entry points for a fresh machine: `make demo` (main job) and `make test` (the test suite).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The release pinned here is the one this project is tested with. On a machine with an NVIDIA
# driver pip picks the normal CUDA build; set TORCH_SPEC / TORCH_INDEX_URL to choose another.
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX_URL ?=
PYTEST_ARGS ?=

.PHONY: setup demo test bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL)) "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

# The main job on the embedded default: edit a real clip with the tiny editor, several clips
# stitched by LVSC with motion compensation.
DEMO_VIDEO ?= ../shared/fixtures/videos/car-turn.mp4
demo: setup
	mkdir -p outputs/demo
	$(VENV)/bin/infer edit $(DEMO_VIDEO) --prompt "make it snowy" -o outputs/demo/edited.mp4 \
		--steps 8 --resolution 64 --motion-compensation

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: setup
	$(PY) bench/model.py

clean:
	rm -rf $(VENV) outputs .pytest_cache
