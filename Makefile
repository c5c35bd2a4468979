# The README's commands. Each target creates .venv and installs what it needs, so
# `make test` and `make book` work on a fresh clone.
SHELL := /bin/bash
PY    := .venv/bin/python
BIN   := .venv/bin
STAMP := .venv/.installed-stamp
# The notebook tests and CI run the smallest profile.
# No download at test time (HF_HUB_OFFLINE), and base models cached inside the clone.
CI_ENV := TINYLLAMA_PROFILE=ci MPLBACKEND=Agg PYTHONHASHSEED=0 HF_HUB_OFFLINE=1 TINYLLAMA_CACHE=$(CURDIR)/.cache/tinyllama

SPEEDRUN_PROFILE ?= cpu

.PHONY: speedrun bench student base-models help venv export clean-nbs check-export test test-fast test-nbs test-unit test-book book browser notebooks

help:
	@echo "make test   - set up .venv and run everything CI runs (export check, notebooks, unit tests, book + browser)"
	@echo "make book   - set up .venv and build the rendered book into book/_build/html"
	@echo "make speedrun - set up .venv, then tokenizer -> pretraining -> samples -> SFT -> PPO on the story world; writes runs/<time>/report.md"
	@echo "make bench - the benchmarks against transformers (bench/)"
	@echo "make base-models - train (or take from the cache) each profile's base model into dist/base-models/ for the Hub"
	@echo "make student - the notebooks without their solutions, for a class, in dist/student/"
	@echo "make export - regenerate tinyllama/ from nbs/ (nbdev-export) and clean the notebooks"

venv: $(STAMP)

# torch 2.13.0 first: an unpinned torch would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

export: venv
	$(BIN)/nbdev-export
	$(BIN)/nbdev-clean

# The package is generated from the notebooks, and notebooks are committed clean.
check-export: venv
	$(BIN)/nbdev-export
	@git status --porcelain -- tinyllama | grep . && { echo "tinyllama/ is out of sync with nbs/: run 'make export' and commit"; git diff --stat -- tinyllama; exit 1; } || true
	$(BIN)/nbdev-clean
	@git status --porcelain -- nbs | grep . && { echo "notebooks are not clean: run 'make export' and commit"; exit 1; } || true

# A browser for the book test: Debian's chromium (never playwright's own download).
browser:
	@command -v chromium >/dev/null || { apt-get update -qq && apt-get install -y -qq chromium >/dev/null; }

test-nbs: venv
	$(CI_ENV) $(BIN)/pytest --nbval-lax -p no:cacheprovider -n 2 --dist loadfile nbs/

test-unit: venv
	$(CI_ENV) $(BIN)/pytest -n 2 tests/ --ignore=tests/test_book.py

# The unit tests without the slow ones (processes, whole pipelines): under a minute.
test-fast: venv
	$(CI_ENV) $(BIN)/pytest -m "not slow" tests/ --ignore=tests/test_book.py

book: venv
	bash scripts/vendor_book_assets.sh
	$(PY) scripts/make_book_config.py
	$(BIN)/jupyter-book build book -W --keep-going --all
	@echo "The book is at $(CURDIR)/book/_build/html/index.html"

test-book: book browser
	$(CI_ENV) $(BIN)/pytest tests/test_book.py

test: venv
	@start=$$(date +%s); \
	$(MAKE) --no-print-directory check-export test-nbs test-unit test-book && \
	echo "make test: all passed in $$(( $$(date +%s) - start )) s"

# Re-run every chapter in the cpu profile and keep the outputs (what the book shows).
notebooks: venv
	cd nbs && for nb in [0-9]*.ipynb; do TINYLLAMA_PROFILE=cpu ../$(BIN)/jupyter nbconvert --to notebook --execute --inplace $$nb || exit 1; done
	$(BIN)/nbdev-clean

# The first thing to run: tokenizer -> pretraining -> samples, with a report.
speedrun: venv
	$(BIN)/tinyllama speedrun --profile $(SPEEDRUN_PROFILE)

# The student edition: solutions (### BEGIN/END SOLUTION, {solution} cells) removed.
# The folders a maintainer uploads to the Hub (chapter 07d): each profile's base model.
base-models: venv
	$(PY) -c "from tinyllama.base import export_base_models as e; e('dist/base-models')"

student: venv
	$(PY) scripts/make_student.py --out dist/student

# The bench extra adds torchao (decode.py's torchao int8 row); `make test` never needs it.
bench: venv
	$(PY) -m pip install -q -e ".[bench]"
	$(PY) bench/train_throughput.py
	$(PY) bench/decode.py --shape course-cpu
	$(PY) bench/decode.py --shape stories15M-like
	$(PY) bench/decode.py --shape stories15M
