"""--device for infer.py and evaluate.py: the name checked before anything loads (stdlib), the device itself
refused before any model loads when this machine lacks it (torch), and an out-of-memory error told as the flags
that size the work. One home, so both commands take the same names and say the same lines."""
import re

from .errors import UsageError

DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def check_device_name(flag, name):
    """A name torch would not take (gpu, cuda0, CPU): one line with the ones it does."""
    if not DEVICE.match(name):
        raise UsageError(f"{flag} {name}: unknown device; use auto, cpu, cuda, cuda:N or mps")


def pick_device(name, flag="--device"):
    """The device to run on ('auto': cuda, then mps, then cpu), refused before any model loads if this machine
    lacks it."""
    import torch
    check_device_name(flag, name)
    mps = torch.backends.mps.is_available()
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if mps else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"{flag} {name}: torch sees no CUDA GPU here (torch {torch.__version__}); "
                         f"use {flag} cpu or auto")
    if name.startswith("cuda:") and int(name[5:]) >= torch.cuda.device_count():
        raise UsageError(f"{flag} {name}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                         f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    if name == "mps" and not mps:
        raise UsageError(f"{flag} mps: torch sees no Apple MPS device here; use {flag} cpu or auto")
    return name


def out_of_memory(error):
    """True for torch's out-of-memory errors: CUDA's own type, and the CPU allocator's RuntimeError."""
    import torch
    if isinstance(error, (MemoryError, getattr(torch, "OutOfMemoryError", MemoryError))):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and any(s in text for s in (
        "out of memory", "can't allocate memory", "not enough memory", "Cannot allocate memory"))
