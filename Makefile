# Two commands do all the setup: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run test bench screenshots browser promtool wrk lint format messages clean

# The compiled catalog is built, never committed.
CATALOG := translations/pt_BR/LC_MESSAGES/messages

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.runtime: requirements.txt pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -r requirements.txt
	$(BIN)/pip install --quiet --no-deps -e .
	touch $@

$(VENV)/.dev: requirements-dev.txt $(VENV)/.runtime
	$(BIN)/pip install --quiet -r requirements-dev.txt
	touch $@

$(CATALOG).mo: $(CATALOG).po $(VENV)/.runtime
	$(BIN)/pybabel compile -d translations

## messages: extract the pages' strings and merge them into the catalogs (then translate the new ones)
messages: $(VENV)/.runtime
	$(BIN)/pybabel extract -F babel.cfg --no-location --sort-output --project enrichment-lookup -o translations/messages.pot .
	$(BIN)/pybabel update -i translations/messages.pot -d translations --width 110

## run: install into .venv and run Redis, sandbox, web, worker and beat in the foreground
run: $(VENV)/.runtime $(CATALOG).mo
	$(BIN)/python -m devstack.launcher

## test: install into .venv and run the whole suite against private Redis servers
test: $(VENV)/.dev $(CATALOG).mo browser promtool wrk
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Every benchmark (bench/NAME.py, run as `python -m bench.NAME`); `make bench QUICK=1` runs the short
# versions, as make test does.
BENCHMARKS := cached_lookup uncached_latency celery_ceiling throughput streams backlog rate_fidelity batch_interference

## bench: run every benchmark and rewrite docs/benchmarks.md (QUICK=1: short runs that rewrite nothing)
bench: $(VENV)/.dev $(CATALOG).mo wrk
	@for name in $(BENCHMARKS); do \
	  if [ -f bench/$$name.py ]; then \
	    echo "== python -m bench.$$name"; $(BIN)/python -m bench.$$name $(if $(QUICK),--quick) || exit 1; \
	  else echo "== bench/$$name.py is missing"; exit 1; fi; \
	done

## screenshots: rerun the page tests and save their screenshots into docs/screenshots/
screenshots: $(VENV)/.dev $(CATALOG).mo browser
	UPDATE_SCREENSHOTS=1 $(BIN)/python -m pytest tests/test_page_browser.py tests/test_batch_page.py

## browser: Debian's Chromium for the page tests, installed with apt when missing (as root, as in CI)
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    export DEBIAN_FRONTEND=noninteractive; \
	    apt-get install -y -qq chromium >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq chromium; } \
	      || echo "*** could not install chromium: the browser tests will be SKIPPED ***"; \
	  else \
	    echo "*** chromium not found (install Debian's chromium package): the browser tests will be SKIPPED ***"; \
	  fi; }

## promtool: Debian's prometheus package, for checking docs/alerts.yml, installed with apt when missing (as root)
promtool:
	@command -v promtool >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    export DEBIAN_FRONTEND=noninteractive; \
	    apt-get install -y -qq --no-install-recommends prometheus >/dev/null 2>&1 \
	      || { apt-get update -qq && apt-get install -y -qq --no-install-recommends prometheus; } \
	      || echo "*** could not install prometheus: the alert-rule tests will be SKIPPED ***"; \
	  else \
	    echo "*** promtool not found (install Debian's prometheus package): the alert-rule tests will be SKIPPED ***"; \
	  fi; }

## wrk: Debian's wrk (a C load generator) for bench/cached_lookup.py's full-speed figures, installed with apt when missing (as root)
wrk:
	@command -v wrk >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    export DEBIAN_FRONTEND=noninteractive; \
	    apt-get install -y -qq --no-install-recommends wrk >/dev/null 2>&1 \
	      || { apt-get update -qq && apt-get install -y -qq --no-install-recommends wrk; } \
	      || echo "*** could not install wrk: bench/cached_lookup.py cannot run and its test will be SKIPPED ***"; \
	  else \
	    echo "*** wrk not found (install Debian's wrk package): bench/cached_lookup.py cannot run and its test will be SKIPPED ***"; \
	  fi; }

lint: $(VENV)/.dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

format: $(VENV)/.dev
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) var .pytest_cache $(CATALOG).mo
