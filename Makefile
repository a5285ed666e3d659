# cptoy: make lab | make test | make figures | make bench | make present | make gpu-check
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: lab test unit notebooks figures bench present gpu-check lint clean-venv

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

lab: $(STAMP)
	$(VENV)/bin/jupyter-lab --notebook-dir=notebooks $(if $(filter 0,$(shell id -u)),--allow-root,)

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile tests --nbmake notebooks

unit: $(STAMP)
	$(PY) -m pytest -q tests

notebooks: $(STAMP)
	$(PY) -m pytest -q -n 2 --nbmake notebooks

figures: $(STAMP)
	$(PY) -m cptoy figures --out figures

present: $(STAMP)
	$(PY) -m cptoy present

bench: $(STAMP)
	$(PY) bench/em_vs_hals.py

lint: $(STAMP)
	$(VENV)/bin/ruff check cptoy tests bench

clean-venv:
	rm -rf $(VENV)
