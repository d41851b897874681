# The two commands a new machine needs:
#   make run   - create .venv, install, start the whole suite (page on http://127.0.0.1:8080)
#   make test  - create .venv, install, run every test
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup run test gen check-gen bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

run: setup
	$(VENV)/bin/tensorwire up

test: setup
	$(PY) scripts/gen_protos.py --check
	$(PY) -m pytest -q -ra

gen: setup
	$(PY) scripts/gen_protos.py

clean:
	rm -rf $(VENV) var .pytest_cache
