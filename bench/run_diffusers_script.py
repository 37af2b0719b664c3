#!/usr/bin/env python
"""Run one of diffusers' example training scripts here, for side-by-side benches:

    python bench/run_diffusers_script.py path/to/train_dreambooth_lora_sd3.py --flags ...

Those scripts import torchvision for a few image transforms; PyPI's torchvision is a CUDA build whose operators
do not load against this project's CPU torch. transformers is asked first (its answer is cached: no torchvision),
then bench/shims/ goes on the path with PIL stand-ins for those transforms, then the script runs as __main__.
diffusers' scripts also insist on a diffusers dev version (check_min_version); the installed release is used.
"""
import os
import runpy
import sys

from transformers.utils import import_utils

import_utils.is_torchvision_available()  # evaluated (and cached) before the stand-in is importable
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "shims"))
import diffusers.utils  # noqa: E402

diffusers.utils.check_min_version = lambda version: None
script = sys.argv[1]
sys.argv = sys.argv[1:]
runpy.run_path(script, run_name="__main__")
