# neuronetz-gateway: local stack, tests and checks. `make help` lists the targets.
SHELL := /bin/bash
.DEFAULT_GOAL := help

UV ?= uv
LOCAL := compose/local/run.sh
# The one install step (apt packages as root, uv, the locked environment); quiet when done.
INSTALL := compose/local/install.sh
export PATH := $(HOME)/.local/bin:/usr/local/bin:$(PATH)
# Extra pytest arguments, e.g. `make test PYTEST_ARGS="-k redis -x"`.
PYTEST_ARGS ?=
# Extra benchmark arguments, e.g. `make bench BENCH_ARGS=--quick`.
BENCH_ARGS ?=

.PHONY: help up down status migrate test lint bench

help: ## List the targets.
	@grep -E '^[a-z]+:.*## ' $(MAKEFILE_LIST) | awk -F ':.*## ' '{printf "  make %-8s %s\n", $$1, $$2}'

up: ## Install what is missing, start the gateway on 127.0.0.1:8080 and print a demo key.
	@$(LOCAL) up

down: ## Stop everything `make up` started (safe to run twice).
	@$(LOCAL) down

status: ## Show which parts run and what /readyz says.
	@$(LOCAL) status

migrate: ## Run `alembic upgrade head` against the local database.
	@$(LOCAL) migrate

# pytest exits 5 when it collected nothing; that must never pass as green.
test: ## Run the test suite against real Postgres, Redis, Caddy and policyd.
	@$(INSTALL)
	@rc=0; $(UV) run pytest $(PYTEST_ARGS) || rc=$$?; \
	if [[ $$rc -eq 5 ]]; then \
		echo "make test: pytest collected no tests (check PYTEST_ARGS, testpaths and markers)" >&2; \
		exit 1; \
	fi; \
	exit $$rc

lint: ## ruff check, ruff format --check, mypy --strict and bandit (security lint).
	@$(INSTALL)
	$(UV) run ruff check .
	$(UV) run ruff format --check .
	$(UV) run mypy --strict
	@# bandit warns "nosec encountered, but no failed test" for every sub-node of a justified
	@# multi-line f-string (the SQL in meterd/writes.py); those lines only are dropped.
	$(UV) run bandit -q -c pyproject.toml -r policyd meterd compose migrations \
		2> >(grep -v 'nosec encountered' >&2)

# wrk (Debian package) drives saturation; the install step brings it.
bench: ## Benchmark gateway vs Caddy alone vs Ollama stand-in (BENCH_ARGS=--quick: ~1 min).
	@$(INSTALL)
	$(UV) run python -m tests.bench.run $(BENCH_ARGS)
