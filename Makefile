# MiniMoE: `make book` builds the executed book into _build/html, `make test` is what CI runs,
# `make clean` removes _build. Both bootstrap .venv on first use. See README.md.
#
# Knobs (environment or command line):
#   PYTHON=python3.11         interpreter used to create .venv (default: python3.11, else python3)
#   TORCH_PIP_ARGS=...        extra pip arguments for the torch install, e.g.
#                             "--index-url https://download.pytorch.org/whl/cpu" for the CPU-only wheel
#   MINIMOE_CACHE=dir         where the model zoo caches trained models (default ~/.cache/minimoe);
#                             passed through to notebooks and tests untouched.
#
# Besides Python, the build needs Node.js/npm (18+): see "Offline reading" below.

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

# Offline reading: by default myst-nb loads the widget renderer (@jupyter-widgets/html-manager) and
# RequireJS from CDNs, and Sphinx loads MathJax from jsdelivr, so a downloaded _build/html shows no
# widgets or equations without a network. npm fetches them at the exact versions in
# package-lock.json (`npm ci`, rerun only when package.json or the lockfile changes; node_modules/
# is not committed), then only the files the pages load are staged into $(ASSETS), with
# book/_ext/widgets-setup.js, which _config.yml's html_static_path copies to _build/html/_static/offline/
# (nb_ipywidgets_js and mathjax_path point there). `make assets` does just this step.
NPM_STAMP := node_modules/.package-lock.json
ASSETS := _build/offline-assets
ASSETS_STAMP := $(ASSETS)/.staged
HTML_MANAGER := node_modules/@jupyter-widgets/html-manager
# MathJax 3: the combined TeX/MathML -> CommonHTML component, the TeX extensions it autoloads
# (\require, \cancel, ...), the CHTML fonts, and what its context menu loads (accessibility, speech).
MATHJAX_FILES := tex-mml-chtml.js input/tex/extensions output/chtml a11y ui sre

# jupyter-book's execution cache keys on notebook content only; drop it when the library changes,
# so the book never shows outputs computed by older code.
LIB_SOURCES := $(shell find minimoe -type f \( -name '*.py' -o -name '*.json' \) 2>/dev/null)
EXEC_STAMP := _build/.library-stamp

.PHONY: book test clean assets

book: $(STAMP) $(EXEC_STAMP) $(ASSETS_STAMP)
	$(PY) -m minimoe.claims --write book/claims.md
	$(BOOK_BUILD)

assets: $(ASSETS_STAMP)

test: $(STAMP) $(EXEC_STAMP) $(ASSETS_STAMP)
	$(PY) -m pytest -q tests
	@notebooks="$$(find book -name '*.ipynb' -not -path '*/.ipynb_checkpoints/*' | sort)"; \
	if [ -z "$$notebooks" ]; then \
	  echo "make test: no notebooks under book/, skipping nbval"; \
	else \
	  echo $(NBVAL) $$notebooks; \
	  $(NBVAL) $$notebooks; \
	fi
	$(BOOK_BUILD)
# Every built page in headless Chromium with the network blocked: JavaScript errors, broken links and
# images, widgets and equations that did not render (tests_browser/test_book_pages.py).
	$(PY) -m pytest -q tests_browser

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

$(NPM_STAMP): package.json package-lock.json
	@command -v npm >/dev/null 2>&1 || { echo "error: npm not found on PATH. The book serves the widget renderer, RequireJS and MathJax itself (read offline, no CDN), fetched with npm: install Node.js 18+ with npm (e.g. apt-get install nodejs npm)" >&2; exit 1; }
	npm ci --ignore-scripts --no-audit --no-fund
	touch $@

$(ASSETS_STAMP): $(NPM_STAMP) book/_ext/widgets-setup.js Makefile
	rm -rf $(ASSETS)
	mkdir -p $(ASSETS)/offline/widgets $(ASSETS)/offline/mathjax
	cp book/_ext/widgets-setup.js node_modules/requirejs/require.js $(ASSETS)/offline/
	cp $(HTML_MANAGER)/dist/embed-amd.js $(HTML_MANAGER)/dist/*.woff2 $(HTML_MANAGER)/dist/*.woff $(ASSETS)/offline/widgets/
	cp node_modules/@fortawesome/fontawesome-free/LICENSE.txt $(ASSETS)/offline/widgets/fontawesome.LICENSE.txt
	(cd node_modules/mathjax/es5 && tar cf - $(MATHJAX_FILES)) | (cd $(ASSETS)/offline/mathjax && tar xf -)
	cp node_modules/mathjax/LICENSE $(ASSETS)/offline/mathjax/
	touch $@
