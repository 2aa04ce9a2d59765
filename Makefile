# `make run` starts Parley on the embedded default; `make test` runs every test.
# Every target uses the project's own .venv; no need to activate it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: run serve test bench browser lint-docker db-upgrade archive-prepare keys parley clean

run: $(VENV)/.runtime
	$(BIN)/parley keys bootstrap
	BIND=127.0.0.1:$${PORT:-8000} WEB_CONCURRENCY=$${WEB_CONCURRENCY:-1} LOG_FORMAT=$${LOG_FORMAT:-text} \
		$(BIN)/gunicorn -c gunicorn.conf.py "main:create_app()"

# The production server (gunicorn.conf.py) with its defaults: 0.0.0.0, two workers, JSON logs.
serve: $(VENV)/.runtime
	$(BIN)/gunicorn -c gunicorn.conf.py "main:create_app()"

db-upgrade: $(VENV)/.runtime
	$(BIN)/parley db-upgrade

archive-prepare: $(VENV)/.runtime
	$(BIN)/parley archive-prepare

# make keys ARGS="create --role client --name 'my app'"   (or list, revoke ID, rotate ID)
keys: $(VENV)/.runtime
	$(BIN)/parley keys $(ARGS)

# Any other command: make parley ARGS="audit-prune"
parley: $(VENV)/.runtime
	$(BIN)/parley $(ARGS)

test: $(VENV)/.dev browser
	$(BIN)/ruff check .
	$(BIN)/hadolint Dockerfile
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The browser tests (the chat page, the staff console) drive Debian's chromium through
# Playwright (which cannot download a browser of its own here): installed with apt-get only when missing.
browser:
	@test -x /usr/bin/chromium || { $(SUDO) apt-get update && $(SUDO) apt-get install -y --no-install-recommends chromium; }

bench: $(VENV)/.dev
	$(BIN)/python -m bench.turn_latency
	$(BIN)/python -m bench.staff_search
	$(BIN)/python -m bench.hot_path --seconds 12 --rounds 2
	$(BIN)/python -m bench.cpu_split
	$(BIN)/python -m bench.model_call
	$(BIN)/python -m bench.capacity --clients 400 1000 --seconds 20
	$(BIN)/python -m bench.soak --seconds 60
	$(BIN)/python -m bench.client_list
	$(BIN)/python -m bench.archive_export
	$(BIN)/python -m bench.stream_first_delta
	$(BIN)/python -m bench.stream_concurrency
	$(BIN)/python -m bench.handoff_reads
	$(BIN)/python -m bench.files
	$(BIN)/python -m bench.knowledge_search

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# `-e .` installs the `parley` command (pyproject.toml) linked to this checkout.
$(VENV)/.runtime: requirements.txt pyproject.toml | $(VENV)/bin/python
	$(BIN)/pip install --quiet -r requirements.txt -e .
	touch $@

$(VENV)/.dev: requirements.txt requirements-dev.txt pyproject.toml | $(VENV)/bin/python
	$(BIN)/pip install --quiet -r requirements-dev.txt -e .
	touch $@ $(VENV)/.runtime

# The container files are checked by a linter; nothing is built here.
lint-docker: $(VENV)/.dev
	$(BIN)/hadolint Dockerfile

clean:
	rm -rf $(VENV) .pytest_cache
