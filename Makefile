# cnnext developer commands. `make demo` and `make test` work on a fresh Debian/Ubuntu machine
# with Python 3.11: each creates (or reuses) .venv, installs torch and the build/test tools,
# installs Boost.Context with apt when running as root, builds cnnext and runs.
SHELL := /bin/bash
PYTHON_BIN ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC := torch==2.14.1 torchvision==0.29.1
export MAX_JOBS ?= 2
# nvcc lives here on our machines; torch's own guess (/usr/local) is wrong.
ifneq ($(wildcard /usr/local/cuda/bin/nvcc),)
export CUDA_HOME ?= /usr/local/cuda
endif
PYTEST_ARGS ?=

.PHONY: help setup sysdeps build sanitizers demo test test-fast lint format bench clean

help:
	@echo "make demo   set up, build and run the demo (examples/train_digits.py)"
	@echo "make test   set up, build and run the whole test suite"
	@echo "make lint   ruff + clang-format checks;  make format: apply them"
	@echo "make bench  run the benchmark suite (python -m benchmarks.run --quick)"

# --no-cache-dir: torch's CUDA wheels fill ~5.5 GB of the venv; a second copy in pip's cache
# once ran a CI machine out of disk.
$(VENV)/.deps-stamp: requirements-dev.txt
	@test -x $(PY) || $(PYTHON_BIN) -m venv $(VENV)
	$(PY) -m pip install -q --no-cache-dir --upgrade pip setuptools wheel
	$(PY) -m pip install -q --no-cache-dir $(TORCH_SPEC)
	$(PY) -m pip install -q --no-cache-dir -r requirements-dev.txt
	@touch $@

setup: $(VENV)/.deps-stamp sysdeps

# Boost.Context gives the emulator fast fibers; without it the emulator uses ucontext (slower).
sysdeps:
	@if [ ! -e /usr/include/boost/context/detail/fcontext.hpp ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing libboost-context-dev"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libboost-context-dev >/dev/null; \
	  else \
	    echo "note: libboost-context-dev is missing; the emulator will use ucontext fibers"; \
	  fi; \
	fi

build: setup
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .

# The emulator built under AddressSanitizer and under ThreadSanitizer, beside the normal one
# (cnnext/_C_emu_asan*.so, _C_emu_tsan*.so), for tests/test_sanitizers.py. Incremental; when the
# compiler has no such runtime it says so and tests/test_sanitizers.py skips.
sanitizers: setup
	$(PY) tools/run_sanitized.py --sanitizer address --build-only
	$(PY) tools/run_sanitized.py --sanitizer thread --build-only

demo: build
	$(PY) -m cnnext
	$(PY) examples/train_digits.py

test: build sanitizers
	$(PY) -m cnnext
	$(PY) -m pytest -q $(PYTEST_ARGS) tests

# Without the nvcc build (quicker while iterating on CPU/emulator code).
test-fast: setup sanitizers
	CNNEXT_CUDA=0 $(PY) -m pip install -q --no-build-isolation --no-deps -e .
	$(PY) -m pytest -q -x $(PYTEST_ARGS) tests

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	git ls-files 'csrc/*' 'tests/*.cu' | grep -E '\.(cpp|h|cu|cuh)$$' | xargs $(VENV)/bin/clang-format --dry-run -Werror

format: setup
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .
	git ls-files 'csrc/*' 'tests/*.cu' | grep -E '\.(cpp|h|cu|cuh)$$' | xargs $(VENV)/bin/clang-format -i

bench: build
	$(PY) -m benchmarks.run --quick

clean:
	rm -rf build dist *.egg-info cnnext/*.so cnnext/_build_info.py
