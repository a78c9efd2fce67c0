# Two commands on a fresh machine:  `make generate`  and  `make test`.
# Both create .venv and install what they need (the runtime alone for generate).
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
ARGS ?=
# pip install -e without setuptools' "Editable installation" box, which warns that a folder named like
# a package in the working directory could shadow it: here none is (the packages sit in train/,
# runtime/, ...), so the box only buried the first lines of `make generate`.
EDITABLE_INSTALL := PYTHONWARNINGS="ignore:Editable installation" $(BIN)/pip install -q -e

.PHONY: generate test dist bench shipped-model shipped-model-gru2x512 shakespeare-gru2x512 shakespeare-gru2x512-awd shakespeare-gru3x512-awd \
	shakespeare-gru3x512-awd-20 shakespeare-gru3x512-awd-20-seed-2 \
	shakespeare-gru2x512-awd-no-locked-dropout-seed-2 shakespeare-gru2x512-awd-budget \
	shakespeare-gru2x512-awd-budget-seed-2 upgrade-bundles quality clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# runtime only: numpy, click, onnxruntime (CPU build)
$(VENV)/.runtime: pyproject.toml | $(BIN)/python
	$(EDITABLE_INSTALL) '.[cpu]'
	touch $@

# everything: training/export (TensorFlow, tf2onnx, onnx) and the test tools
$(VENV)/.dev: pyproject.toml | $(BIN)/python
	$(EDITABLE_INSTALL) '.[cpu,train,test,jax]'
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
	$(call train_or_resume,shakespeare,)
	$(BIN)/charrnn-export runs/shakespeare models/shakespeare --force --validation-text train/data/sonnets.txt
	$(BIN)/charrnn-run --model models/shakespeare --seed 1 > models/shakespeare/sample.txt

# Train (or resume) runs/$(1) with options $(2): a killed run continues where it stopped.
train_or_resume = if [ -f runs/$(1)/config.json ]; then $(BIN)/charrnn-train --resume runs/$(1); \
	else $(BIN)/charrnn-train --out runs/$(1) $(2); fi

# Train (or resume) runs/$(1) with options $(2), export it to runs/$(1)/bundle and score it held out
# (runs/$(1)/quality.json), beside the bundles $(3).
define train_export_score
	$(call train_or_resume,$(1),$(2))
	$(BIN)/charrnn-export runs/$(1) runs/$(1)/bundle --force --runtime-only
	$(BIN)/python benchmarks/quality.py runs/$(1)/bundle $(3) --out runs/$(1)/quality.json
endef

# The second shipped bundle: the best recipe these 2 cores trained in at most 2 hours, on the first
# 90% of Tiny Shakespeare (the last 10% held out, as nanoGPT's char-level baseline splits it): round 2's
# recipe cut to the budget (shakespeare-gru2x512-awd-budget below, which also scores it), exported and sampled.
shipped-model-gru2x512: $(VENV)/.dev
	$(call train_or_resume,shakespeare-gru2x512-awd-budget,$(GRU2X512_AWD_BUDGET))
	$(BIN)/charrnn-export runs/shakespeare-gru2x512-awd-budget models/shakespeare-gru2x512 --force --runtime-only
	$(BIN)/charrnn-run --model models/shakespeare-gru2x512 --seed 1 > models/shakespeare-gru2x512/sample.txt

# Round 1, the bundle shipped before (b): 2×GRU(512) with dropout 0.3 and a cosine schedule over 24 epochs
# (records in benchmarks/round1/shakespeare-gru2x512).
GRU2X512 = --layers 2 --cell gru --units 512 --embedding-dim 128 --dropout 0.3 --seq-length 200 \
	--batch-size 32 --learning-rate 0.002 --lr-schedule cosine --min-learning-rate 0.0001 --clip-norm 5 \
	--epochs 24 --validation-fraction 0.1 --early-stopping 4
shakespeare-gru2x512: $(VENV)/.dev
	$(call train_export_score,$@,$(GRU2X512),models/shakespeare-gru2x512)

# Round 2 (issue 20): the recipe above with AWD-LSTM's regularisers and weight averaging: locked
# dropout, weight drop on the recurrent kernels, AdamW, and an EMA of the weights from epoch 10 (the
# EMA is validated and exported); 28 epochs.
GRU2X512_AWD = --layers 2 --cell gru --units 512 --embedding-dim 128 --dropout 0.25 --locked-dropout \
	--weight-drop 0.25 --weight-decay 0.05 --average ema --average-start 10 --ema-decay 0.999 --seq-length 200 \
	--batch-size 32 --learning-rate 0.002 --lr-schedule cosine --min-learning-rate 0.0001 --clip-norm 5 \
	--epochs 28 --validation-fraction 0.1 --early-stopping 4
shakespeare-gru2x512-awd: $(VENV)/.dev
	$(call train_export_score,shakespeare-gru2x512-awd,$(GRU2X512_AWD),models/shakespeare-gru2x512)

# Round 3: compute. (c) was still improving when its schedule ended, and training's GRU now projects its
# inputs before the time loop (benchmarks/train_speed.py), so a deeper net for 32 epochs within the 2-hour
# budget; an EMA from epoch 20 with a horizon of 500 steps (3 epochs), so that it does not reach back
# into the higher learning rates of the schedule. The recipe plus overrides (click keeps an option's last value).
GRU3X512_AWD = $(GRU2X512_AWD) --layers 3 --average-start 20 --ema-decay 0.998 --epochs 32
shakespeare-gru3x512-awd: $(VENV)/.dev
	$(call train_export_score,shakespeare-gru3x512-awd,$(GRU3X512_AWD),models/shakespeare-gru2x512)

# The final recipe: round 3 cut to the 2-hour budget (its 32 epochs took 141 min): 20 epochs, which fit even
# at the slowest this VM has run them (348 s: 116 min), and no weight average, which cost 0.002-0.007
# nats in every run that did not overfit (round 2 and its seed 2, round 3). It trained in 109 min and tied with
# the shipped bundle (1.4462 against 1.4467 held out, README), so it did not replace it.
# And the same recipe with another seed, for the spread.
GRU3X512_AWD_20 = $(GRU3X512_AWD) --epochs 20 --average none
shakespeare-gru3x512-awd-20: $(VENV)/.dev
	$(call train_export_score,$@,$(GRU3X512_AWD_20),models/shakespeare-gru2x512)
shakespeare-gru3x512-awd-20-seed-2: $(VENV)/.dev
	$(call train_export_score,$@,$(GRU3X512_AWD_20) --seed 2,models/shakespeare-gru2x512)

# The best run within the budget (the round-2 recipe without locked dropout, 1.4422 held out) with another
# seed: whether its lead over round 1's bundle is more than the spread between seeds. It is (1.4436 against
# seed 42's 1.4422 and round 1's 1.4467, README), but this seed took 124 min (under JAX, on a slower host).
GRU2X512_AWD_PLAIN_DROPOUT = $(GRU2X512_AWD) --no-locked-dropout
shakespeare-gru2x512-awd-no-locked-dropout-seed-2: $(VENV)/.dev
	$(call train_export_score,$@,$(GRU2X512_AWD_PLAIN_DROPOUT) --seed 2,models/shakespeare-gru2x512)

# The best recipe cut to the 2-hour budget, on the slower hosts too: 26 epochs (at the 257 s an epoch its seed 2
# averaged idle under JAX, 111 min) and no weight average, which cost both its seeds 0.006-0.007 in training's
# validation (their weights not averaged: 1.4419 and 1.4418 at epoch 27). Trained under JAX (faster on these
# hosts, README) unless KERAS_BACKEND says otherwise, like the shipped bundle: this run is it (107 min, 1.4417
# held out). And its second seed, for the spread of the shipped recipe (108 min, 1.4402: 0.0015 apart).
GRU2X512_AWD_BUDGET = $(GRU2X512_AWD_PLAIN_DROPOUT) --average none --epochs 26
shakespeare-gru2x512-awd-budget shakespeare-gru2x512-awd-budget-seed-2 shipped-model-gru2x512: export KERAS_BACKEND ?= jax
shakespeare-gru2x512-awd-budget: $(VENV)/.dev
	$(call train_export_score,$@,$(GRU2X512_AWD_BUDGET),models/shakespeare-gru2x512)
shakespeare-gru2x512-awd-budget-seed-2: $(VENV)/.dev
	$(call train_export_score,$@,$(GRU2X512_AWD_BUDGET) --seed 2,models/shakespeare-gru2x512)

# Ablations of the round-2 recipe (README): the recipe with one regulariser taken out (or embedding dropout,
# which it lacks, put in), or another seed;
# click keeps an option's last value, so each is the recipe plus one override.
# `make ablation-no-weight-drop` trains (or resumes) runs/shakespeare-gru2x512-awd-no-weight-drop.
ABLATION_no-weight-drop = --weight-drop 0
ABLATION_no-locked-dropout = --no-locked-dropout
ABLATION_no-weight-decay = --weight-decay 0
ABLATION_no-average = --average none
ABLATION_with-embedding-dropout = --embedding-dropout 0.1
ABLATION_seed-2 = --seed 2
# A misspelt name would train the recipe itself under another name: refused before anything runs.
$(foreach goal,$(filter ablation-%,$(MAKECMDGOALS)),$(if $(ABLATION_$(goal:ablation-%=%)),,\
	$(error no $(goal): one of $(sort $(patsubst ABLATION_%,ablation-%,$(filter ABLATION_%,$(.VARIABLES)))))))
ablation-%: $(VENV)/.dev
	$(call train_export_score,shakespeare-gru2x512-awd-$*,$(GRU2X512_AWD) $(ABLATION_$*))

# The shipped bundles' derived graphs (int8 cell, sampling loop, prefill) remade from their fp32 model.onnx
# and validated, in place: no training run or TensorFlow needed (after a change to export/quantize.py, ...).
upgrade-bundles: $(VENV)/.dev
	$(BIN)/charrnn-export --upgrade models/shakespeare --validation-text train/data/sonnets.txt
	$(BIN)/charrnn-export --upgrade models/shakespeare-gru2x512

# Held-out quality (README table): the report's setup trained on the same 90%, against the bundle above.
quality: $(VENV)/.dev
	$(call train_or_resume,shakespeare-report-90,--validation-fraction 0.1)
	$(BIN)/charrnn-export runs/shakespeare-report-90 runs/shakespeare-report-90/bundle --force --runtime-only
	$(BIN)/python benchmarks/quality.py runs/shakespeare-report-90/bundle models/shakespeare-gru2x512

.PHONY: serve bench-serve

# the server: runtime + FastAPI/uvicorn
$(VENV)/.serve: pyproject.toml | $(BIN)/python
	$(EDITABLE_INSTALL) '.[cpu,serve]'
	touch $@

serve: $(VENV)/.serve  ## charrnn-serve: OpenAI-compatible completions at http://127.0.0.1:8000/v1
	$(BIN)/charrnn-serve $(ARGS)

bench-serve: $(VENV)/.dev  ## charrnn-serve under 1-256 concurrent clients vs the in-process runtime (~5 min)
	$(BIN)/python benchmarks/serve_benchmark.py $(ARGS)

clean:
	rm -rf $(VENV) build dist *.egg-info runtime/*.egg-info .pytest_cache .hypothesis
