# The two commands of the README: `make run` and `make test`. Both set up everything they need.
SHELL := /bin/bash
PYTHON ?= python3
VENV := backend/.venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: run test lint format migrate install simulator bench lock clean

# Installs exactly the versions pinned in backend/constraints.txt (refresh them with `make lock`).
$(STAMP): backend/pyproject.toml backend/constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c backend/constraints.txt -e 'backend[dev]'
	touch $(STAMP)

install: $(STAMP)

migrate: $(STAMP)
	cd backend && .venv/bin/alembic upgrade heads

run: migrate
	@command -v bwrap >/dev/null 2>&1 || echo "make run: bubblewrap is not installed: repository commands of API-key users are refused until it is (apt-get install bubblewrap)" >&2
	cd backend && BIND_HOST=$(HOST) exec .venv/bin/uvicorn app.main:create_app --factory --host $(HOST) --port $(PORT)

simulator: $(STAMP)
	cd backend && exec .venv/bin/uvicorn app.simulator.app:create_app --factory --host 127.0.0.1 --port 8100

lint: $(STAMP)
	cd backend && .venv/bin/ruff check app tests alembic ../bench
	cd backend && .venv/bin/ruff format --check app tests alembic ../bench
	cd backend && .venv/bin/mypy app

format: $(STAMP)
	cd backend && .venv/bin/ruff format app tests alembic ../bench && .venv/bin/ruff check --fix app tests alembic ../bench

test: lint
	cd backend && .venv/bin/python -m pytest -q $(PYTEST_ARGS)

bench: $(STAMP)
	cd backend && .venv/bin/python ../bench/llm_overhead.py

# Re-resolve every dependency to its newest allowed version and pin the result.
lock:
	rm -rf /tmp/asa-lock-venv && $(PYTHON) -m venv /tmp/asa-lock-venv
	/tmp/asa-lock-venv/bin/python -m pip install --quiet --upgrade pip
	/tmp/asa-lock-venv/bin/python -m pip install --quiet -e 'backend[dev]'
	{ echo '# Pinned versions that `make run` and `make test` install (pip constraints).'; \
	  echo '# Refresh: `make lock` (resolves backend/pyproject.toml afresh in a scratch venv).'; \
	  /tmp/asa-lock-venv/bin/python -m pip freeze --exclude-editable; } > backend/constraints.txt
	rm -rf /tmp/asa-lock-venv

clean:
	rm -rf $(VENV) backend/data
