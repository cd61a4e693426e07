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

# $(call apt_tool,COMMAND,PACKAGE,WHAT IS SKIPPED[,APT OPTIONS]): install Debian's PACKAGE with apt when COMMAND is
# missing (as root, as in CI); otherwise say loudly what will be skipped.
define apt_tool
@command -v $(1) >/dev/null 2>&1 || { \
  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
    export DEBIAN_FRONTEND=noninteractive; \
    apt-get install -y -qq $(4) $(2) >/dev/null 2>&1 \
      || { apt-get update -qq && apt-get install -y -qq $(4) $(2); } \
      || echo "*** could not install $(2): $(3) ***"; \
  else \
    echo "*** $(1) not found (install Debian's $(2) package): $(3) ***"; \
  fi; }
endef

## browser: Debian's Chromium for the page tests, installed with apt when missing (as root, as in CI)
browser:
	$(call apt_tool,chromium,chromium,the browser tests will be SKIPPED)

## promtool: Debian's prometheus package, for checking docs/alerts.yml, installed with apt when missing (as root)
promtool:
	$(call apt_tool,promtool,prometheus,the alert-rule tests will be SKIPPED,--no-install-recommends)

## wrk: Debian's wrk (a C load generator) for bench/cached_lookup.py's full-speed figures, installed with apt when missing (as root)
wrk:
	$(call apt_tool,wrk,wrk,bench/cached_lookup.py cannot run and its test will be SKIPPED,--no-install-recommends)

lint: $(VENV)/.dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

format: $(VENV)/.dev
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) var .pytest_cache $(CATALOG).mo
