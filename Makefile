# lightning-protos: `make demo` installs and trains on an embedded data set, `make test` runs the tests.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
export PROTOS_DATA_DIR ?= $(abspath ../shared/data)

.PHONY: install demo test test-all lint bench-smoke device-bundle clean

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

# What a GPU machine of the device tool lacks (no network there): the pure-Python wheels that its
# PyTorch image does not hold and the offline data (MNIST gzipped). Carry .device, then run
# `bash benchmarks/device_check.sh` there.
device-bundle: install
	rm -rf .device && mkdir -p .device/wheels .device/data/MNIST/raw
	$(BIN)/pip download --quiet --no-deps --dest .device/wheels \
		jsonargparse docstring-parser typeshed-client medmnist fire termcolor
	for f in $(PROTOS_DATA_DIR)/MNIST/raw/*-ubyte; do gzip -c $$f > .device/data/MNIST/raw/$$(basename $$f).gz; done
	cp -r $(PROTOS_DATA_DIR)/pneumoniamnist.npz $(PROTOS_DATA_DIR)/usps $(PROTOS_DATA_DIR)/pendigits .device/data/
	du -sh .device

clean:
	rm -rf runs bench_runs lightning_logs
