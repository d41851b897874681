# The two commands a new machine needs:
#   make run   - create .venv, install, start the whole suite (page on http://127.0.0.1:8080)
#   make test  - create .venv, install, run every test
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

WEB := clients/web
WEB_BUILT := $(WEB)/dist/index.html
WEB_SOURCES := $(wildcard $(WEB)/src/*.ts $(WEB)/src/*.css $(WEB)/src/gen/*/*.ts $(WEB)/src/gen/*/*/*.ts \
	$(WEB)/src/gen/*/*/*/*.ts) $(WEB)/index.html $(WEB)/build.mjs $(WEB)/tsconfig.json

.PHONY: setup run test lint gen check-gen bench clean web system-deps native

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

# The browser app: npm ci when the lock file changes, type-check + bundle when a
# source changes (prints the bundle's gzip size; fails over its 84 KiB budget).
web: $(WEB_BUILT)

$(WEB)/node_modules/.installed: $(WEB)/package-lock.json
	cd $(WEB) && npm ci --no-audit --no-fund
	touch $@

$(WEB_BUILT): $(WEB)/node_modules/.installed $(WEB_SOURCES)
	cd $(WEB) && npx tsc --noEmit -p . && node build.mjs

# Debian's chromium for the browser tests (apt; only when /usr/bin/chromium is missing).
system-deps:
	bash scripts/install-system-deps.sh

# The native inference frontend (native/frontend.cc, Debian's grpc++): built into
# services/inference/_native*.so when the system-deps packages are there, else
# skipped in one line (the service then serves with its Python frontend).
native: setup
	bash scripts/build-native.sh $(PY)

run: setup native web
	$(VENV)/bin/tensorwire up

# ruff (pyflakes, pycodestyle, isort, bugbear, pyupgrade, ...) and mypy, pinned in the
# test extra; zero findings, or `make test` stops here.
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy tensorwire services

test: setup lint system-deps native web
	$(PY) scripts/gen_protos.py --check
	$(PY) -m pytest -q -ra

gen: setup
	$(PY) scripts/gen_protos.py

clean:
	rm -rf $(VENV) var .pytest_cache $(WEB)/node_modules $(WEB)/dist build/native build/native-asan \
		services/inference/_native*.so
