# make demo: set up .venv and run the pipeline on the embedded default model (SmolLM2-135M).
# make test: set up .venv and run the test suite.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# WikiText-2 and the task files: $CLP_DATA, else ../shared/data when it exists
export CLP_DATA ?= $(abspath $(wildcard ../shared/data))

.PHONY: demo test clean

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

demo: $(VENV)/.installed
	$(PY) load_weights.py --ckpt smollm2-135m

test: $(VENV)/.installed
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) .pytest_cache runs
