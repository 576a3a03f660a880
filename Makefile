# kms developer commands. `make run` and `make test` work on a fresh Debian machine with python3.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CONFIG ?= etc/kms.toml
TRIAL_ARGS ?= -j2

.PHONY: venv run test lint bench clean

venv: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet --editable '.[dev]' --config-settings editable_mode=compat
	touch $@

run: venv
	$(BIN)/kmsctl --config $(CONFIG) dev-setup
	$(BIN)/twistd --nodaemon --pidfile= kms --config $(CONFIG)

test: venv
	$(BIN)/trial $(TRIAL_ARGS) tests

lint: venv
	$(BIN)/ruff check kms tests bench twisted
	$(BIN)/mypy kms

bench: venv
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) _trial_temp* *.egg-info
