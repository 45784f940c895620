# Two entry points (see README): `make demo` and `make test`. Each sets up .venv first.
PYTHON ?= python3
VENV ?= .venv
# The CPU build of PyTorch. On a machine without a local CPU wheel, use for example
#   make TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" test
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: setup demo test wheel-check clean

$(BIN)/graphopt: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e ".[dev]"
	@touch $@

setup: $(BIN)/graphopt

demo: setup
	$(BIN)/graphopt inspect examples/tiny_mlp.onnx
	$(BIN)/graphopt convert examples/tiny_mlp.onnx -o build/demo/tiny_mlp.gir
	$(BIN)/graphopt convert build/demo/tiny_mlp.gir -o build/demo/tiny_mlp.onnx
	$(BIN)/graphopt inspect build/demo/tiny_mlp.onnx --ir

test: setup
	$(BIN)/python -m pytest -q

wheel-check: setup
	$(BIN)/python scripts/check_wheel.py

clean:
	rm -rf build dist *.egg-info
