# `make demo`, `make test` (CI) and `make test-fast`. Each creates .venv when
# missing; the demo installs the package alone, the tests add their extras.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Two stamps: `make demo` installs the package alone (what the demo runs);
# `make test` adds the test extras (torch, peft, ...) on top, once.
RUNTIME := $(VENV)/.installed-runtime
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast venv clean

$(RUNTIME): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	touch $(RUNTIME)

# open_clip (the reference of the OpenCLIP import tests) goes in without its
# torchvision: PyPI's torchvision is built for CUDA torch and, next to the CPU
# torch pinned here, fails to load and breaks `import peft`.
# tests/open_clip_import.py stubs the torchvision names open_clip imports.
$(STAMP): $(RUNTIME)
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps open-clip-torch==3.3.0
	touch $(STAMP)

venv: $(STAMP)

demo: $(RUNTIME)
	$(PY) train.py --config configs/tiny.py --workdir runs/tiny
	$(PY) eval.py --config configs/tiny.py --workdir runs/tiny \
	    --checkpoint best_loss \
	    --zeroshot synthetic_visu:shape,synthetic_visu:colour
	$(PY) -m hysac_jax.demo runs/tiny

test: $(STAMP)
	$(PY) -m pytest -q tests

# The edit loop: everything but the tests marked slow (pods, SIGKILL resume,
# CLI and export round trips).
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests

clean:
	rm -rf $(VENV) runs .pytest_cache
