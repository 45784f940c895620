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
	$(BIN)/pip install -q -e ".[dev,tvm]"
	@touch $@

setup: $(BIN)/graphopt

# The main job on the embedded default model (a Llama-style checkpoint trained with train/):
# evaluate it, optimize it for ONNX Runtime (checking numerics after every pass), run the
# artifact, and generate from it; then compare latency and accuracy across variants
# (build/demo/compare.html, one self-contained page).
demo: setup
	$(BIN)/graphopt eval examples/default
	$(BIN)/graphopt optimize examples/default -o build/demo/default --check-numerics --explain-fusions
	$(BIN)/graphopt inspect build/demo/default
	$(BIN)/python scripts/run_artifact.py build/demo/default examples/default
	$(BIN)/graphopt generate examples/default --prompt "def " --max-new-tokens 80
	$(BIN)/graphopt generate build/demo/default --prompt "def " --max-new-tokens 80
	$(BIN)/graphopt compare examples/default --seq 32,128 --runs 10 --min-time 0.5 \
		--variants fp32,int4,ort-plain,ort-optimizer,ort-int8 --generate 32 \
		--data examples/default/val.txt --data-tokens 2048 \
		--json build/demo/compare.json --html build/demo/compare.html

test: setup
	$(BIN)/python -m pytest -q

wheel-check: setup
	$(BIN)/python scripts/check_wheel.py

clean:
	rm -rf build dist *.egg-info
