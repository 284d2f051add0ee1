# lightning-protos: `make demo` installs and trains on an embedded data set, `make test` runs the tests.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
export PROTOS_DATA_DIR ?= $(abspath ../shared/data)

.PHONY: install demo test test-all lint bench-smoke clean

install: $(BIN)/protos

$(BIN)/protos: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -e '.[dev]'
	@touch $@

demo: install
	$(BIN)/protos fit --config configs/cm_digits.yaml --trainer.enable_progress_bar false \
		--trainer.default_root_dir runs/demo
	@echo "TensorBoard: $(BIN)/tensorboard --logdir runs/demo"

test: install
	$(BIN)/pytest -q

test-all: install
	$(BIN)/pytest -q -m ""

lint: install
	$(BIN)/ruff check lightning_protos tests benchmarks
	$(BIN)/ruff format --check lightning_protos tests benchmarks

bench-smoke: install
	$(BIN)/protos bench --config configs/bench/smoke.yaml

clean:
	rm -rf runs bench_runs lightning_logs
