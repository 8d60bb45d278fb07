# `make demo` and `make test` work on a fresh machine that has nothing but Python 3.10+.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q

.PHONY: venv test demo lint clean

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# The CPU build first: the torch range in setup.cfg is then already satisfied and no CUDA is pulled.
	$(PIP) install "torch==2.13.*"
	$(PIP) install -e ".[test]"
	$(PY) -c "import torch, transformers, modeling_instructcell"
	touch $@

venv: $(VENV)/.installed

test: venv
	$(PY) -m pytest -q

demo: venv
	$(PY) examples/demo.py --output-dir outputs/demo

lint: venv
	$(PY) -m ruff check .

clean:
	rm -rf $(VENV) outputs build *.egg-info
