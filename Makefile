# The two commands of the README: `make demo` and `make test`. Both install what they need.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
# End-to-end tests run the real Prometheus, promtool and Alertmanager, and headless Chromium for
# the landing page, all from Debian's packages.
SERVERS := prometheus promtool prometheus-alertmanager amtool chromium
PACKAGES := prometheus prometheus-alertmanager chromium fonts-liberation
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test servers clean bench

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

demo: $(BIN)/.installed
	$(BIN)/callingbox-exporter --demo

servers:
	@for tool in $(SERVERS); do command -v $$tool >/dev/null || missing=1; done; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages $(PACKAGES)"; \
		$(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends \
			$(PACKAGES) >/dev/null; \
	fi

# Lint and format are checked first: they take a second, the tests minutes. The tests run in
# pytest-xdist workers side by side, more workers than a 2-core machine has cores: most end-to-end
# tests wait on polls, scrapes and rule evaluations, not on the CPU. `--dist loadfile` keeps a
# module on one worker, so a module fixture (the benchmark run of test_benchmarks.py) is built
# once; files go out in name order, so the long test_e2e_* files start early, not last.
# (`--dist loadgroup` would be finer, but it groups nothing with pytest 9.2: pytest-xdist#1386.)
TEST_WORKERS ?= 4
test: $(BIN)/.installed servers
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS)

# The benchmark suite of BENCHMARKS.md: one table, ~6 min; BENCH_ARGS=--quick for a 30 s smoke run.
bench: $(BIN)/.installed
	$(BIN)/python -m benchmarks $(BENCH_ARGS)

clean:
	rm -rf $(VENV) *.egg-info
