# The command line of the project (see README.md and docs/contracts.md).
VENV    := .venv
PY      := $(VENV)/bin/python
N       ?= 1
CONFIG  ?= configs/default.yaml
RUN     ?= default
OUTPUT  ?=
ARGS    ?=

round_args = --config $(CONFIG) --run $(RUN) $(if $(OUTPUT),--output $(OUTPUT)) $(ARGS)

.PHONY: setup round rounds test bench bench-train bench-reward bench-generate bench-round gpu-check experiment experiment-replay check-venv

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

## pytest exits 5 when it collects no tests; say so rather than fail on a bare code
test: check-venv
	@$(PY) -m pytest tests; status=$$?; \
	if [ $$status -eq 5 ]; then echo "pytest collected no tests"; exit 0; fi; exit $$status

## make bench: the benchmarks in bench/ (numbers go to docs/bench/ and docs/benchmarks.md)
bench: bench-train bench-reward bench-generate bench-round

## the trainer against TRL's DPOTrainer (TRL comes with the test extra of pyproject.toml)
bench-train: check-venv
	$(PY) bench/train_bench.py $(ARGS)

## hf_classifier scoring, length-sorted batches against unsorted ones (random 135M classifier, CPU)
bench-reward: check-venv
	$(PY) bench/reward_bench.py $(ARGS)

## generation throughput: our generate stage against vLLM called directly and transformers generate
## (docs/bench/generate.json, the Speed section of docs/results.md)
bench-generate: check-venv
	$(PY) bench/generate_bench.py $(ARGS)

## make gpu-check [ARGS="--quick --device cpu --out FILE --parts ... --trl-wheel WHL|DIR"]: on a lent GPU, without
## Ray or vLLM, in minutes: bf16 log-prob parity of the tiny families, a ~1B training step (tokens/s, MFU), FSDP2 on
## one rank, reward batch invariance, TRL's DPOTrainer side by side (docs/bench/gpu-check.json on cuda). A machine
## without the venv: make gpu-check PY=$(command -v python3)
gpu-check: check-venv
	$(PY) bench/gpu_check.py $(ARGS)

## where a round's wall time goes, per stage: start-up, Ray, Parquet I/O and the work itself
## (docs/bench/round.json, the `round` section of docs/results.md). Runs rounds 1-3 of CONFIG on the
## old path (bench-round-old: engines restarted, reference on its own) and then as the run bench-round
## (both replaced each time); ARGS="--from-run runs/<run>" only reads that run's rounds.
bench-round: check-venv
	$(PY) bench/round_breakdown.py --config $(CONFIG) $(if $(OUTPUT),--output $(OUTPUT)) \
		$(if $(filter --from-run%,$(ARGS)),,--compare-old) $(ARGS)

## make experiment [N=3] [CONFIG=...] [OUTPUT=...] [ARGS="--methods dpo,listmle key=value ..."]:
## iterative DPO against the LarPO objectives, N rounds each (hours on CPU), then docs/results.md.
## ARGS="--summarize-only" only rewrites the table, the plot and the verdict from the runs there are.
## make experiment-replay: the default config with train.replay none, previous and all (docs/results.md)
experiment-replay: check-venv
	$(PY) bench/experiment.py --config $(CONFIG) --methods contrastive,replay-none,replay-previous,replay-all \
		$(if $(OUTPUT),--output $(OUTPUT)) $(ARGS)

experiment: check-venv
	$(PY) bench/experiment.py --config $(CONFIG) $(if $(filter-out file default,$(origin N)),--rounds $(N)) \
		$(if $(OUTPUT),--output $(OUTPUT)) $(ARGS)
