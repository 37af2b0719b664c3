"""Shared code for train_dreambooth_lora.py and infer.py: one module per concern.

config      flags, --config files, fail-fast validation
data        images, captions, crops, buckets, the training dataset
priors      class-prior images: count, generate the missing ones, cache
models      loading the base model (hub id, folder, single file) and attaching LoRA
lora_io     LoRA state dicts in diffusers and kohya layout, atomic saves, model card
validation  sample images during training and save them as a grid
checkpoints checkpoints, exact resume, signals
report      trackers, train_stats.json, loss.png, config.yaml and the model card
"""

__version__ = "0.1.0"
