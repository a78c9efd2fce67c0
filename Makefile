# Two commands on a fresh machine:  `make generate`  and  `make test`.
# Both create .venv and install what they need (the runtime alone for generate).
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
ARGS ?=

.PHONY: generate test dist bench shipped-model clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# runtime only: numpy, click, onnxruntime (CPU build)
$(VENV)/.runtime: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[cpu]'
	touch $@

# everything: training/export (TensorFlow, tf2onnx, onnx) and the test tools
$(VENV)/.dev: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[cpu,train,test]'
	touch $@ $(VENV)/.runtime

generate: $(VENV)/.runtime  ## 1,000 characters from the shipped Shakespeare model
	$(BIN)/charrnn-run $(ARGS)

test: $(VENV)/.dev  ## the whole test suite (a few minutes on 2 cores)
	$(BIN)/python -m pytest -q $(ARGS)

# dist/: the sdist and the wheel built from it, as pip builds from an sdist (.ci/wheel tests them)
dist: | $(BIN)/python
	$(BIN)/pip install -q build
	$(BIN)/python -m build --outdir dist .

bench: $(VENV)/.dev  ## speed table against the report's own loop (~5 min)
	$(BIN)/python benchmarks/benchmark.py $(ARGS)

# The shipped model: train the report's setup (~40 min on 2 cores), export it, sample it.
shipped-model: $(VENV)/.dev
	if [ -f runs/shakespeare/config.json ]; then $(BIN)/charrnn-train --resume runs/shakespeare; \
	else $(BIN)/charrnn-train --out runs/shakespeare; fi
	$(BIN)/charrnn-export runs/shakespeare models/shakespeare --force --validation-text train/data/sonnets.txt
	$(BIN)/charrnn-run --model models/shakespeare --seed 1 > models/shakespeare/sample.txt

clean:
	rm -rf $(VENV) build dist *.egg-info runtime/*.egg-info .pytest_cache .hypothesis
