# MiniMoE: `make book` builds the executed book into _build/html, `make test` is what CI runs,
# `make clean` removes _build. Both bootstrap .venv on first use. See README.md.
#
# Knobs (environment or command line):
#   PYTHON=python3.11         interpreter used to create .venv (default: python3.11, else python3)
#   TORCH_PIP_ARGS=...        extra pip arguments for the torch install, e.g.
#                             "--index-url https://download.pytorch.org/whl/cpu" for the CPU-only wheel
#   MINIMOE_CACHE=dir         where the model zoo caches trained models (default ~/.cache/minimoe);
#                             passed through to notebooks and tests untouched.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := book
.DELETE_ON_ERROR:

PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3 2>/dev/null)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.minimoe-installed
# One source of truth for the torch pin: pyproject.toml.
TORCH_PIN := $(shell sed -n 's/^[[:space:]]*"\(torch==[^"]*\)".*/\1/p' pyproject.toml)
TORCH_PIP_ARGS ?=

# jupyter-book has no `python -m` entry point; call its CLI through the venv's interpreter.
JUPYTER_BOOK := $(PY) -c 'import sys; from jupyter_book.cli.main import main; sys.argv[0] = "jupyter-book"; sys.exit(main())'
# -W: warnings (including a notebook that fails to execute) are errors. --keep-going reports them
# all before failing (the exit status is still non-zero). --all re-reads every page: otherwise a page
# that failed once is pickled as read and a rerun passes silently. Re-reading is cheap because
# notebooks that ran cleanly come from the execution cache.
BOOK_BUILD := $(JUPYTER_BOOK) build -W --keep-going --all .
NBVAL := $(PY) -m pytest -p no:cacheprovider --nbval-lax --nbval-current-env --nbval-cell-timeout=600

# jupyter-book's execution cache keys on notebook content only; drop it when the library changes,
# so the book never shows outputs computed by older code.
LIB_SOURCES := $(shell find minimoe -type f \( -name '*.py' -o -name '*.json' \) 2>/dev/null)
EXEC_STAMP := _build/.library-stamp

.PHONY: book test clean

book: $(STAMP) $(EXEC_STAMP)
	$(PY) -m minimoe.claims --write book/claims.md
	$(BOOK_BUILD)

test: $(STAMP) $(EXEC_STAMP)
	$(PY) -m pytest -q tests
	@notebooks="$$(find book -name '*.ipynb' -not -path '*/.ipynb_checkpoints/*' | sort)"; \
	if [ -z "$$notebooks" ]; then \
	  echo "make test: no notebooks under book/, skipping nbval"; \
	else \
	  echo $(NBVAL) $$notebooks; \
	  $(NBVAL) $$notebooks; \
	fi
	$(BOOK_BUILD)

clean:
	rm -rf _build

# torch goes first, on its own and exactly pinned, so the `.[dev]` install finds it satisfied and
# never swaps in another build (an unpinned torch from PyPI is a multi-GB CUDA download on Linux).
$(STAMP): pyproject.toml
	@if [ -z "$(PYTHON)" ]; then echo "error: python3.11 (or python3 >= 3.11) not found on PATH" >&2; exit 1; fi
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "error: $(PYTHON) is Python %d.%d; MiniMoE needs 3.11+ (set PYTHON=...)" % sys.version_info[:2])'
	@if [ -z "$(TORCH_PIN)" ]; then echo "error: no torch==... pin found in pyproject.toml" >&2; exit 1; fi
	[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install $(TORCH_PIP_ARGS) '$(TORCH_PIN)'
	$(PY) -m pip install -e '.[dev]'
	touch $@

$(EXEC_STAMP): $(LIB_SOURCES) $(STAMP)
	rm -rf _build/.jupyter_cache
	mkdir -p _build
	touch $@
