# Two commands on a fresh machine (Rust, CPython >= 3.11 and pip are all that is needed):
#   make demo   - create .venv, build and install shoal, run the demo
#   make test   - same set-up, then every check: fmt, clippy, ruff, mypy (strict), stubtest,
#                 cargo test, pytest, the examples of README.md and docs/, the docs site
#   make docs   - build the docs site into site/ (mkdocs --strict: any warning fails)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.deps-installed
LINTED := python tests bench examples conftest.py docs/_hooks.py

.PHONY: demo test bench bench-scaling bench-store bench-mpi build lint fmt clean docs doctest

$(STAMP): requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $(STAMP)

build: $(STAMP)
	$(PY) -m maturin develop --release --quiet

demo: build
	$(PY) -m shoal demo

lint: $(STAMP)
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings
	$(VENV)/bin/ruff check $(LINTED)
	$(VENV)/bin/ruff format --check $(LINTED)

test: build lint
	$(PY) -m mypy
	$(PY) -m mypy.stubtest shoal._native --allowlist stubtest-allowlist.txt
	cargo test -p shoal-core
	$(PY) -m pytest
	$(MAKE) doctest docs

# Every ```python block of the README and of docs/ runs as a test (globals: conftest.py).
doctest: build
	$(PY) -m pytest --markdown-docs -m markdown-docs -p no:cacheprovider README.md docs

docs: build
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet

bench: build
	$(PY) -m pip install --quiet -r bench/requirements.txt
	$(PY) bench/run.py --json bench/results.json
	$(PY) bench/plot.py bench/results.json bench/results.png

bench-scaling: build
	$(PY) -m pip install --quiet -r bench/requirements.txt
	$(PY) bench/run.py --scaling 1,2,4,8,16 --json bench/scaling.json
	$(PY) bench/plot.py bench/scaling.json bench/scaling.png --table

bench-mpi: build
	$(PY) bench/mpi.py --rounds 4

bench-store: build
	scripts/install-bench-deps.sh
	$(PY) bench/store.py

fmt: $(STAMP)
	cargo fmt --all
	$(VENV)/bin/ruff format $(LINTED)
	$(VENV)/bin/ruff check --fix $(LINTED)

clean:
	rm -rf $(VENV) target site
