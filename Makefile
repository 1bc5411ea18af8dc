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

demo: $(STAMP)
	$(BIN)/python -m aligndet.data.demo --out data/demo
	$(BIN)/python -m aligndet.data.proposals --out data/demo/proposals/train
	$(BIN)/python train_box.py --output-dir outputs/demo_box --resume
	$(BIN)/python finetune.py --init outputs/demo_box/checkpoint.pth --output-dir outputs/demo_finetune

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf $(VENV) outputs
