# Setup, demo and tests on the local embedded default (real Redis, nx-27017, small model).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PODEMBED := HF_HUB_OFFLINE=1 $(BIN)/podembed
STAMP := $(VENV)/.installed-stamp

.PHONY: install redis-server test-tools services-up services-down demo test lint bench producer-bench soak scale eval fleet clean

install: $(STAMP) redis-server

# Every version from config/constraints.txt, the list the Modal image installs too. torch first: the CPU
# wheel on this machine, before anything could pull a CUDA build.
CONSTRAINTS := config/constraints.txt

$(STAMP): pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c $(CONSTRAINTS) torch
	$(BIN)/pip install -q -c $(CONSTRAINTS) -e '.[local,dev]'
	touch $(STAMP)

redis-server:
	@command -v redis-server >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; }

# The suite's tools from Debian: chromium for the browser tests (Playwright downloads no browser of its
# own here), promtool (package prometheus) to check and unit-test config/alerts.yml.
test-tools:
	@command -v chromium >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }
	@command -v promtool >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null; }

services-up: install
	$(PODEMBED) services up

services-down:
	@if [ -x $(BIN)/podembed ]; then $(PODEMBED) services down; fi

demo: services-up
	@job=$$($(PODEMBED) ingest examples/ --podcast "The Seen and the Unseen" --json | $(BIN)/python -c 'import json,sys; print(json.load(sys.stdin)["job_id"])') && \
	echo "ingested examples/ as job $$job" && \
	$(PODEMBED) work --burst && \
	$(PODEMBED) status $$job

# The suite starts its own Redis and nx-27017 on spare ports and stops them at the end; it names its
# 25 slowest tests, where cutting the suite's time starts.
test: install test-tools
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q --durations=25

# Pipeline vs bare model on 20 real episodes (one JSON document; see BENCHMARKS.md).
bench: install
	HF_HUB_OFFLINE=1 $(BIN)/python tests/bench/pipeline_bench.py

# Catalog-scale backfill: 3,000+ episodes, 400,000+ chunks, streamed, killed halfway and resumed (one JSON document).
scale: install
	HF_HUB_OFFLINE=1 $(BIN)/python tests/bench/scale.py

# Producer parse and chunk throughput on the 120 real episodes (one JSON document; see BENCHMARKS.md).
producer-bench: install
	HF_HUB_OFFLINE=1 $(BIN)/python tests/bench/producer_bench.py

# Fault drills, 10,000+ bad inputs, 20,000+ chunks through two workers (one JSON document; see RELIABILITY.md).
soak: install
	HF_HUB_OFFLINE=1 $(BIN)/python tests/soak/soak.py

# Retrieval quality on held-out real episodes (recall@1/5/10, MRR: vector, BM25, hybrid) and the exact
# scan's speed over 100k stored vectors (one JSON document; see BENCHMARKS.md).
eval: install
	HF_HUB_OFFLINE=1 $(BIN)/python tests/bench/eval.py

# The control plane at 1 to 64 drains on one queue, a model stand-in (declared in the output), faults, priority and
# the launcher simulated (one JSON document, and .podembed/fleet/fleet.png; see BENCHMARKS.md).
fleet: install
	HF_HUB_OFFLINE=1 $(BIN)/python tests/bench/fleet.py

lint: install
	$(BIN)/ruff check config producer worker modal_jobs tests

clean: services-down
	rm -rf $(VENV) .podembed
