# One-command setup, run and test. Telemetry switches come from adps/telemetry.env (one place).
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

include adps/telemetry.env
export $(shell sed -n 's/^\([A-Z_]*\)=.*/\1/p' adps/telemetry.env)

.PHONY: setup run test lint clean help up down

help:  ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

setup: $(STAMP)  ## create .venv and install the pinned lock (quick when already done)

$(STAMP): requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -qq --disable-pip-version-check -r requirements.lock
	$(BIN)/pip install -qq --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

run: setup  ## run the whole pipeline (dvc repro) on the embedded dataset and print the metrics table
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro
	$(BIN)/adps report

test: setup  ## run ruff, the import contracts (pyproject.toml) and the test suite
	$(BIN)/ruff check adps flows tests benchmarks scripts
	$(BIN)/lint-imports --no-logo --no-cache
	$(BIN)/pytest

up: setup  ## start Prefect server, MLflow UI and the nightly deployment (logs in .run/)
	BIN=$(BIN) scripts/services.sh up

down:  ## stop what `make up` started
	BIN=$(BIN) scripts/services.sh down

lint: setup  ## ruff check + format check
	$(BIN)/ruff check adps flows tests benchmarks scripts
	$(BIN)/ruff format --check adps flows tests benchmarks scripts

clean:  ## remove generated data, models and reports (not the venv, not data/incoming)
	rm -rf $(filter-out data/incoming,$(wildcard data/*)) models reports mlflow.db mlartifacts optuna.db
