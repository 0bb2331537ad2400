# The two quick-start commands (README): `make run` and `make test`.
# Each creates .venv and installs the project when it is missing, so both work on a fresh machine.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
# torch and torchvision are pinned as a pair: this pair resolves from wheels on our machines and
# imports together (a lone `pip install torchvision` can pull a build that does not match torch).
TORCH_PAIR ?= torch==2.14.1 torchvision==0.29.1
CONFIG ?=
# one pytest worker per core, at most 4: each worker holds torch and a pipeline's data (1-2 GB)
TEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 2); [ "$$n" -gt 4 ] && n=4; echo $$n)

.PHONY: run test lint bench ui clean-home

$(BIN)/llm2loss: pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (set PYTHON=...)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_PAIR)
	$(BIN)/python -m pip install --quiet -e ".[dev,deploy]" $(TORCH_PAIR)
	touch $(BIN)/llm2loss

run: $(BIN)/llm2loss
	HF_HUB_OFFLINE=1 $(BIN)/llm2loss run $(if $(CONFIG),--config $(CONFIG),)

test: $(BIN)/llm2loss
	$(BIN)/ruff check llm2loss_pipeline tests bench
	HF_HUB_OFFLINE=1 $(BIN)/dagster definitions validate -w workspace.yaml
	# the import contracts of pyproject.toml ([tool.importlinter]); no cache, so a module added or
	# removed since the last run cannot leave a stale graph behind
	$(BIN)/lint-imports --no-cache
	# One worker per core: the tests run torch with one thread each (tests/conftest.py), so one
	# process left the other core idle. `loadfile` keeps a file's tests on one worker, so a module
	# fixture (a materialized home) is built once, and the services tests never race each other;
	# files go out in collection order, the end-to-end ones first (tests/conftest.py).
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

lint: $(BIN)/llm2loss
	$(BIN)/ruff check llm2loss_pipeline tests bench
	$(BIN)/ruff format --check llm2loss_pipeline tests bench

ui: $(BIN)/llm2loss
	HF_HUB_OFFLINE=1 $(BIN)/llm2loss ui $(if $(CONFIG),--config $(CONFIG),)
