# Two commands do everything on a fresh machine:  make demo   and   make test
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test test-quick bench clean

setup: $(VENV)/.installed

# Idempotent: re-runs only when the requirements change. torch is pinned first so pip does not
# pick a multi-GB build it does not need; requirements.txt keeps a range that wheel satisfies.
$(VENV)/.installed: requirements.txt requirements-dev.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

demo: setup
	$(PY) examples/make_tiny_model.py --out work_dirs/tiny-sd
	$(PY) train_dreambooth_lora.py --config examples/recipes/tiny_demo.yaml
	$(PY) infer.py --base work_dirs/tiny-sd --lora work_dirs/demo --prompt "a photo of sks dog in a bucket" \
		--num_images 4 --steps 20 --height 64 --width 64 --output work_dirs/demo/samples

test: setup
	$(PY) -m pytest tests -q

test-quick: setup
	$(PY) -m pytest tests -q -m "not slow"

bench: setup
	$(PY) bench/bench_train.py

clean:
	rm -rf work_dirs
