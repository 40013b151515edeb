# Two entry points for a fresh machine: `make demo` (set up, pretrain CARE, evaluate) and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# CPU build of PyTorch. GPU users: `make install TORCH_SPEC=torch` (or the CUDA wheel of their choice).
TORCH_SPEC ?= torch==2.13.0
DEMO_ARGS ?= train_samples=10000 epochs=3
RUN ?= runs/demo-care

.PHONY: install data demo test lint clean

$(BIN)/care: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e .
	touch $@

# The test tools (pytest, ruff, mypy, scipy) only for `make test`: `make demo` does without them.
$(BIN)/pytest: $(BIN)/care
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

install: $(BIN)/care

data:
	bash scripts/get-fashion-mnist.sh

demo: install data
	$(BIN)/care pretrain --config configs/fashion-mnist.yaml method=care out=$(RUN) resume=true $(DEMO_ARGS)
	$(BIN)/care probe $(RUN)
	@echo "care is installed in $(VENV): run 'source $(VENV)/bin/activate' to put it on PATH (or call $(BIN)/care)"

lint: $(BIN)/pytest
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/mypy src

test: $(BIN)/pytest data lint
	$(BIN)/pytest

clean:
	rm -rf $(VENV) runs .mypy_cache .ruff_cache .pytest_cache
