# `make demo` and `make test` set up .venv from requirements.txt when it is
# missing or older than requirements.txt, then run.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test venv clean

venv: $(STAMP)

$(STAMP): requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt
	touch $(STAMP)

# The three stages on the demo dataset (train_image.py, proposals, train_box.py, then finetune.py
# at 10 % labels from stage 1 and from stage 1 + 2), a table and a curves PNG; see aligndet/pipeline.py.
demo: $(STAMP)
	$(BIN)/python -m aligndet.data.demo --out data/demo
	$(BIN)/python -m aligndet.pipeline --out outputs/demo

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf $(VENV) outputs
