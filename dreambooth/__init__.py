"""Shared code for train_dreambooth_lora.py and infer.py: one module per concern (docs/architecture.md).

config      flags, --config files, fail-fast validation        errors     one-line endings, exit codes
files       atomic writes, free space, file sniffing            images     decoding, captions, checks
data        crops, buckets, time-id facts, latent caching       families   SD 1.x/2.x and SDXL behind one seam
models      LoRA attachment and checks against the model        training   loss, step, deferred reads
priors      class-prior images                                  lora_io    diffusers and kohya LoRA files
checkpoints checkpoints, resume checks, signals                 hub        --push_to_hub
report      trackers, stats, model card                         validation validation grids
outputs     the output folder: ownership, overwrite, lock       redaction  the Hub token scrubbed from outputs
"""

__version__ = "0.1.0"
