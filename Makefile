# One entry point for humans and CI: `make test` installs everything it needs
# into .venv (from PyPI and crates.io), builds the wheel, installs it, and runs
# every check. `.ci/run` calls exactly this.
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
SLIM ?= 0
GPU_MIN_FREE_GIB ?= 7
# wheels are not kept in pip's cache: torch's alone would double its ~6 GB
export PIP_NO_CACHE_DIR := 1

.PHONY: test venv lint rust-test wheel py-test bench clean

test: venv lint rust-test wheel py-test

venv:
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "maturin>=1.7,<2"

lint:
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings

# The decoder fuzz tests mutate their corpus for a few seconds from a seed:
# a fixed one here, so a CI run is a gate that passes or fails the same way
# every time (a run explores a prefix of the same mutation sequence). Run
# `make rust-test FUZZ_SEED=` (time-seeded) or the AFL++ targets in
# rust/fuzz/ to look for new failures.
FUZZ_SEED ?= 20261127
HYPOTHESIS_SEED ?= 20261127

rust-test:
	ENGRAMDB_FUZZ_SEED=$(FUZZ_SEED) cargo test --workspace

wheel:
	rm -rf dist
	$(BIN)/maturin build --release --out dist
	# CI machines can be short of disk: with SLIM=1 the cargo build tree goes
	# once the wheel exists (the Python tests need only the wheel)
	if [ "$(SLIM)" = 1 ]; then cargo clean; fi
	$(BIN)/python -m pip install -q --force-reinstall --no-deps "$$(ls dist/engramdb-*.whl)"
	# the optional extras, so their tests run instead of skipping: torch (the
	# GPU kernels run under TRITON_INTERPRET=1 on the CPU), LangChain, Mem0.
	# PyPI's torch is a CUDA build that takes ~6 GB installed; with less disk
	# free than that the GPU suite would end the run half-installed, so it is
	# left out and the run says so loudly (its tests then skip)
	free_gib=$$(df -Pk $(VENV) | awk 'NR==2 {print int($$4 / 1048576)}'); \
	extras="test,langchain,mem0,test-integrations"; \
	if [ "$$free_gib" -ge $(GPU_MIN_FREE_GIB) ]; then extras="$$extras,gpu"; \
	else echo "WARNING: only $$free_gib GiB free: engramdb[gpu] (torch) not installed, GPU tests will skip" >&2; fi; \
	$(BIN)/python -m pip install -q "$$(ls dist/engramdb-*.whl)[$$extras]"

py-test:
	$(BIN)/ruff check python tests benches gpu
	cd /tmp && $(CURDIR)/$(BIN)/python -m mypy.stubtest engramdb._native
	# tests import the installed wheel: python/ is never on sys.path here.
	# Hypothesis draws from a fixed seed for the same reason as FUZZ_SEED
	# (`make py-test HYPOTHESIS_SEED=` draws afresh)
	$(BIN)/python -m pytest tests -q -p no:cacheprovider --durations=15 -m "not gpu" \
		$(if $(HYPOTHESIS_SEED),--hypothesis-seed=$(HYPOTHESIS_SEED))
	# the GPU kernels' tests on every core (pytest-xdist): without a GPU they run
	# in Triton's CPU interpreter, CPU-bound and independent of each other, and
	# were most of the suite's time run one at a time. Without torch (the low-disk
	# case above) they cannot run, and the run says so
	if $(BIN)/python -c "import torch, triton" 2>/dev/null; then \
		$(BIN)/python -m pytest tests -q -p no:cacheprovider --durations=10 -m gpu -n auto \
			$(if $(HYPOTHESIS_SEED),--hypothesis-seed=$(HYPOTHESIS_SEED)); \
	else echo "WARNING: torch/triton not installed: the GPU kernels' tests did not run" >&2; fi

bench:
	$(BIN)/python -m pip install -q "$$(ls dist/engramdb-*.whl)[bench]"
	$(BIN)/python benches/exact.py

clean:
	rm -rf dist target $(VENV)
