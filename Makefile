# The command line of the project (see README.md and ../shared/DESIGN.md).
VENV    := .venv
PY      := $(VENV)/bin/python
N       ?= 1
CONFIG  ?= configs/default.yaml
RUN     ?= default
OUTPUT  ?=
ARGS    ?=

round_args = --config $(CONFIG) --run $(RUN) $(if $(OUTPUT),--output $(OUTPUT)) $(ARGS)

.PHONY: setup round rounds test check-venv

setup:
	bash scripts/setup.sh

check-venv:
	@test -x $(PY) || { echo "error: $(VENV) is missing: run 'make setup' first" >&2; exit 2; }

## make round N=<n> [CONFIG=...] [RUN=...] [OUTPUT=...] [ARGS="key=value ..."]
round: check-venv
	$(PY) -m pipeline round $(N) $(round_args)

## make rounds N=<n>: rounds 1..n, finished ones skipped
rounds: check-venv
	$(PY) -m pipeline rounds $(N) $(round_args)

test: check-venv
	$(PY) -m pytest tests
