# `make demo` and `make test` work on a fresh machine that has nothing but Python 3.10+.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q

.PHONY: venv test demo data train-small perturbation lint clean

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

data: venv
	$(PY) examples/build_dataset.py --data-dir ../shared/datasets --output outputs/instructcell-data

# Both variants of the small preset, 2,000 steps each (about 30 minutes each on 2 CPU cores).
train-small: data
	$(PY) -m instructcell train small-instruct
	$(PY) -m instructcell train small-chat

# Perturbation response on held-out cell types of Kang 2018 (docs/perturbation.md): five small models trained
# side by side, about an hour on 2 shared CPU cores; reruns reuse finished cell types.
perturbation: venv
	$(PY) benchmarks/perturbation.py --data ../shared/datasets/kang2018_pbmc_ifnb_muscat/kang2018_pbmc_ifnb_muscat.h5ad \
		--work-dir outputs/perturbation --output benchmarks/results/perturbation --jobs 5

lint: venv
	$(PIP) install -e ".[dev]"  # ruff is a dev extra, not in the test venv
	$(PY) -m ruff check .

clean:
	rm -rf $(VENV) outputs build *.egg-info
