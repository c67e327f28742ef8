# Everything a fresh machine needs: python3, pip and make. uv is bootstrapped with pip when missing.
SHELL := /bin/bash
UV := python3 -m uv
VENV := .venv
export UV_PROJECT_ENVIRONMENT := $(VENV)

.PHONY: env system-deps demo test screenshot dev serve bench lint clean

env:
	@python3 -m uv --version >/dev/null 2>&1 || python3 -m pip install --quiet uv
	$(UV) sync --frozen --all-groups

demo: env
	$(VENV)/bin/audience-pipeline demo

# Servers and browser the tests drive, from Debian packages when missing: PostgreSQL (the tests start
# their own cluster from its binaries), Chromium (the UI tests; never a browser download) and curl (the
# upload server's test runs mediarithmics' curl calls).
system-deps:
	@need=(); command -v chromium >/dev/null 2>&1 || need+=(chromium); \
	command -v curl >/dev/null 2>&1 || need+=(curl); \
	ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || need+=(postgresql); \
	if (( $${#need[@]} )); then \
	  echo "installing $${need[*]} (apt-get)"; \
	  apt-get install -y "$${need[@]}" >/dev/null 2>&1 || { apt-get update >/dev/null && apt-get install -y "$${need[@]}" >/dev/null; }; \
	fi

# Screenshots of the UI tests land in test-artifacts/; the 25 slowest tests are listed at the end.
# One pytest-xdist worker per core; with work stealing an idle worker takes tests queued on a busy one, so a
# long test does not end the run alone. Every server a test starts listens on a free port of its own.
# The tests' temporary folders (workspaces, Dagster instances, the PostgreSQL clusters) are in RAM when the
# machine has /dev/shm: every import fsyncs its catalog and Dagster-storage commits, and on disk that was a
# third of an import-heavy test's time. A kill (the crash tests) loses no written page either way.
TEST_TMPDIR := $(shell [ -d /dev/shm ] && [ -w /dev/shm ] && echo /dev/shm || echo $${TMPDIR:-/tmp})
test: env system-deps
	TMPDIR=$(TEST_TMPDIR) AUDIENCE_PIPELINE_ARTIFACTS=$(CURDIR)/test-artifacts $(VENV)/bin/pytest -q -n auto --dist worksteal --durations=25

# docs/audience-history.png, the README's picture of one audience's history in the UI, taken by the browser
# test's own steps (which, as every test run, write only to test-artifacts/), then copied.
screenshot: env system-deps
	AUDIENCE_PIPELINE_ARTIFACTS=$(CURDIR)/test-artifacts $(VENV)/bin/pytest -q audience_pipeline_tests/test_ui.py -k member_counts_over_several_imports
	cp test-artifacts/audience-history.png docs/audience-history.png

# The Dagster UI and the daemon (which runs the sensors), with DAGSTER_HOME at the repo root.
dev: env
	DAGSTER_HOME=$(CURDIR) $(VENV)/bin/dagster dev -w workspace.yaml

# The upload server (README, "Uploads over HTTP") on 127.0.0.1:8000, with the same DAGSTER_HOME as `make dev`.
serve: env
	DAGSTER_HOME=$(CURDIR) $(VENV)/bin/audience-pipeline serve

# Every figure of the performance section: imports (16M IDs), analyst queries, the S3 sensor's tick, and how
# a commit and the analyst queries grow with the history (1k, 100k and 1M imports, both catalogs).
bench: env system-deps
	$(VENV)/bin/python benchmarks/import_16m.py
	$(VENV)/bin/python benchmarks/s3_tick.py --objects 20000
	$(VENV)/bin/python benchmarks/catalog_growth.py

lint: env
	$(VENV)/bin/ruff check .

clean:
	rm -rf data/lake data/dagster data/*.duckdb
