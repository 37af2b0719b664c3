# Two commands do everything on a fresh machine:  make demo   and   make test
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test test-quick bench bench-toy clean

setup: $(VENV)/.installed

# Idempotent: re-runs only when the requirements change. torch is pinned first so pip does not
# pick a multi-GB build it does not need; requirements.txt keeps a range that wheel satisfies.
$(VENV)/.installed: requirements.txt requirements-dev.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

# The toy base (examples/toy-base, pretrained by examples/make_toy_base.py and committed) learns the striped
# circle of examples/toy_subject (pivotal tuning + UNet LoRA, prior preservation); demo_grids.py writes
# base-vs-LoRA grids (same seeds) to work_dirs/toy-demo/grids and prints the pixel scorer's numbers.
demo: setup
	HF_HUB_OFFLINE=1 $(PY) train_dreambooth_lora.py --config examples/recipes/toy_demo.yaml \
		--overwrite_output_dir
	HF_HUB_OFFLINE=1 $(PY) examples/demo_grids.py --lora work_dirs/toy-demo \
		--out work_dirs/toy-demo/grids

test: setup
	$(PY) -m pytest tests -q

test-quick: setup
	$(PY) -m pytest tests -q -m "not slow"

bench: setup
	$(PY) bench/bench_train.py

bench-toy: setup
	$(PY) bench/bench_toy.py --num_images 8 --seeds 0,1,2

clean:
	rm -rf work_dirs
