# make demo: set up .venv and run the pipeline on the embedded default model (SmolLM2-135M).
# make test: set up .venv and run the test suite.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# WikiText-2 and the task files: $CLP_DATA, else ../shared/data when it exists
SHARED_DATA := $(abspath $(wildcard ../shared/data))
ifneq ($(SHARED_DATA),)
export CLP_DATA ?= $(SHARED_DATA)
endif

.PHONY: demo test clean

# the optional pictures (plots.py); a failed install only costs the pictures
$(VENV)/.plots: requirements-plots.txt $(VENV)/.installed
	$(PY) -m pip install --quiet -r requirements-plots.txt || echo "matplotlib did not install: the demo runs without pictures"
	touch $@

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

# load the embedded model and continue a prompt; find the best 20% block with the CLP gate and cut it out;
# tune the two layers at the ends of the cut; compare dense and pruned (WikiText-2 test perplexity on its
# first 10 windows of 2048, KL, speed), then the tuned model (perplexity and KL on the same windows);
# last, draw the gate, the KL of the scored blocks and the tuning curve into runs/demo/*.png
demo: $(VENV)/.installed $(VENV)/.plots
	$(PY) load_weights.py --ckpt smollm2-135m --max-new-tokens 8
	$(PY) search.py --ckpt smollm2-135m --prune-ratio 0.2 --log-every 5 --out runs/demo --excise runs/demo/pruned
	$(PY) tune.py --ckpt runs/demo/pruned --steps 40 --out runs/demo/tuned
	$(PY) eval.py --ckpt smollm2-135m --compare runs/demo/pruned --ppl wikitext2 --ppl-windows 10 --latency --new-tokens 32 --json runs/demo/eval.json
	$(PY) eval.py --ckpt runs/demo/tuned --teacher smollm2-135m --ppl wikitext2 --ppl-windows 10 --json runs/demo/eval-tuned.json
	$(PY) plots.py --search-report runs/demo/report.json --tuning runs/demo/tuned --out runs/demo

# one thread: the test models are tiny, and a second OpenMP thread only adds waiting on 2 shared cores
test: $(VENV)/.installed $(VENV)/.plots
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) .pytest_cache runs
