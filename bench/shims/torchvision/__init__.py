"""A stand-in for the few torchvision.transforms diffusers' DreamBooth example scripts use (Resize, crops, flip,
ToTensor, Normalize), on PIL and numpy, so bench/bench_flow.py can run those scripts here: PyPI's torchvision
wheels are CUDA builds whose operators do not load against the CPU torch this project pins. Bench only; nothing
in the trainer imports it. bench/run_diffusers_script.py puts it on the path only after transformers has decided
torchvision is absent (so its image processors do not reach for the rest of torchvision)."""
__version__ = "0.0-bench-shim"
