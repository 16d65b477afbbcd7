# `make demo`, `make test` (CI) and `make test-fast`. Each creates .venv when missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast venv clean

# open_clip (the reference of the OpenCLIP import tests) goes in without its
# torchvision: PyPI's torchvision is built for CUDA torch and, next to the CPU
# torch pinned here, fails to load and breaks `import peft`.
# tests/open_clip_import.py stubs the torchvision names open_clip imports.
$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps open-clip-torch==3.3.0
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) train.py --config configs/tiny.py --workdir runs/tiny
	$(PY) eval.py --config configs/tiny.py --workdir runs/tiny
	$(PY) eval.py --workdir runs/tiny --task zeroshot --dataset synthetic_visu:shape
	$(PY) eval.py --workdir runs/tiny --task zeroshot --dataset synthetic_visu:colour

test: $(STAMP)
	$(PY) -m pytest -q tests

# The edit loop: everything but the tests marked slow (pods, SIGKILL resume,
# CLI and export round trips).
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests

clean:
	rm -rf $(VENV) runs .pytest_cache
