# The README's two set-up commands: `make test` and `make serve`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PORT ?= 8000
# Checkpoint to serve; empty means the embedded default model.
MODEL ?=

.PHONY: test serve venv clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch is pinned explicitly first: an unpinned torch pulls a multi-GB CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev,serve,train]'
	touch $@

venv: $(VENV)/.installed

test: venv
	$(PY) -m pytest tests

serve: venv
	$(VENV)/bin/ernie45 serve $(MODEL) --port $(PORT)

clean:
	rm -rf $(VENV) build *.egg-info
