# `make run` starts a whole pool here; `make test` runs every check CI runs.
# Both create .venv and install what they need on first use (llama-cpp-python builds
# from source once, a few minutes; pip caches the wheel).

PYTHON ?= python3
VENV := .venv

# llama.cpp builds for this machine's CPU (-march=native), AMX included where the CPU lists it; some
# virtual machines list AMX yet trap its instructions (SIGILL at the first generation), so the build
# leaves AMX out on x86-64. On bare metal with AMX, `make LLAMA_CPU_FLAGS= ...` keeps it. The wheel pip
# caches is reused whatever the flags: `pip cache remove llama_cpp_python` before building it anew.
ifeq ($(shell uname -m),x86_64)
LLAMA_CPU_FLAGS ?= -mno-amx-tile -mno-amx-int8 -mno-amx-bf16
endif
export CFLAGS := $(strip $(CFLAGS) $(LLAMA_CPU_FLAGS))
export CXXFLAGS := $(strip $(CXXFLAGS) $(LLAMA_CPU_FLAGS))
BIN := $(VENV)/bin
BROWSER_TESTS := tests/browser
CHROMIUM := /usr/bin/chromium
NPM := $(or $(shell command -v npm 2>/dev/null),/usr/bin/npm)

.PHONY: run test lint typecheck pytest browser-deps llama-tools size clean bench

run: $(VENV)/.run-deps
	$(BIN)/gputorrent up

test: $(VENV)/.dev-deps browser-deps llama-tools lint typecheck pytest

lint: $(VENV)/.dev-deps
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

typecheck: $(VENV)/.dev-deps
	$(BIN)/mypy

# The API's tests again with the pool in three cells on the test Redis, every script's keys checked
# to lie in one cell as a Redis Cluster checks them (docs/architecture.md, "Redis Cluster"). The
# other tests build jobs by hand for one cell.
CELLS_TESTS := $(addprefix tests/integration/,test_cells.py test_auth.py test_routes_native.py \
	test_observability.py test_never_500.py test_overhead.py test_progress.py test_coordinator_link.py)

pytest: $(VENV)/.dev-deps
	$(BIN)/pytest
	GPUTORRENT_TEST_CELLS=3 $(BIN)/pytest $(CELLS_TESTS)

# llama.cpp's ggml-rpc-server and llama-server (a model split over machines), built once per machine
# from the llama.cpp inside llama-cpp-python's sdist into the user's cache; a no-op once built.
llama-tools: $(VENV)/.dev-deps
	$(BIN)/python -m gputorrent.llama_tools

# The dashboard tests drive Debian's Chromium through playwright-core from npm; no browser is
# downloaded. Every step is skipped on later runs (a stamp file, and the programs' own paths);
# Node.js and Chromium come from Debian's packages where they are missing.
browser-deps: $(BROWSER_TESTS)/node_modules/.installed $(CHROMIUM)

$(BROWSER_TESTS)/node_modules/.installed: $(BROWSER_TESTS)/package.json $(BROWSER_TESTS)/package-lock.json | $(NPM)
	$(NPM) ci --prefix $(BROWSER_TESTS) --no-audit --no-fund --loglevel=error
	@touch $@

/usr/bin/npm:
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm

$(CHROMIUM):
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium

# Every benchmark, in an environment of its own (bench/.venv): plotting and the peers compared
# against (bench/requirements.txt: LiteLLM's proxy, Celery) are installed there, never as project
# dependencies. JSON goes to bench/results/, plots to docs/images/, tables to docs/benchmarks.md
# (and docs/scaling.md).
BENCH_VENV := bench/.venv
BENCH_PYTHON := $(BENCH_VENV)/bin/python

bench: $(BENCH_VENV)/.installed
	$(BENCH_PYTHON) bench/added_latency.py
	$(BENCH_PYTHON) bench/throughput.py
	$(BENCH_PYTHON) bench/dispatch.py
	$(BENCH_PYTHON) bench/routing_quality.py
	$(BENCH_PYTHON) bench/stream_latency.py
	$(BENCH_PYTHON) bench/stream_capacity.py
	$(BENCH_PYTHON) bench/real_model.py
	$(BENCH_PYTHON) bench/backend_http.py
	$(BENCH_PYTHON) bench/redis_path.py
	$(BENCH_PYTHON) bench/reproducible.py
	$(BENCH_PYTHON) bench/replication_wait.py
	$(BENCH_PYTHON) bench/swarm.py
	$(BENCH_PYTHON) bench/split.py
	$(BENCH_PYTHON) bench/scale.py
	$(BENCH_PYTHON) bench/metrics_scrape.py
	$(BENCH_PYTHON) bench/cluster_clients.py
	$(BENCH_PYTHON) bench/report.py

$(BENCH_VENV)/.installed: pyproject.toml bench/requirements.txt
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/pip install --quiet -e '.[llamacpp,swarm]' -r bench/requirements.txt
	@touch $@

size:
	@find src -name '*.py' | xargs wc -l | sort -n

$(VENV)/.python:
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "GPU Torrent needs Python 3.11 or newer")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	@touch $@

$(VENV)/.run-deps: $(VENV)/.python pyproject.toml
	$(BIN)/pip install --quiet -e '.[llamacpp,swarm]'
	@touch $@

$(VENV)/.dev-deps: $(VENV)/.python pyproject.toml
	$(BIN)/pip install --quiet -e '.[dev]'
	@touch $@ $(VENV)/.run-deps

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache $(BROWSER_TESTS)/node_modules test-artifacts
