# One entry point for humans and CI: `make test` installs everything it needs
# into .venv (from PyPI and crates.io), builds the wheel, installs it, and runs
# every check. `.ci/run` calls exactly this.
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: test venv lint rust-test wheel py-test bench clean

test: venv lint rust-test wheel py-test

venv:
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "maturin>=1.7,<2"

lint:
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings

rust-test:
	cargo test --workspace

wheel:
	rm -rf dist
	$(BIN)/maturin build --release --out dist
	$(BIN)/python -m pip install -q --force-reinstall "$$(ls dist/engramdb-*.whl)[test]"
	# the optional extras, so their tests run instead of skipping: torch (the
	# GPU kernels run under TRITON_INTERPRET=1 on the CPU), LangChain, Mem0
	$(BIN)/python -m pip install -q "$$(ls dist/engramdb-*.whl)[gpu,langchain,mem0,test-integrations]"

py-test:
	$(BIN)/ruff check python tests benches gpu
	cd /tmp && $(CURDIR)/$(BIN)/python -m mypy.stubtest engramdb._native
	# tests import the installed wheel: python/ is never on sys.path here
	$(BIN)/python -m pytest tests -q -p no:cacheprovider --durations=15

bench:
	$(BIN)/python -m pip install -q "$$(ls dist/engramdb-*.whl)[bench]"
	$(BIN)/python benches/exact.py

clean:
	rm -rf dist target $(VENV)
