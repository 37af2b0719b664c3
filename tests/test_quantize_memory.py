"""What a quantized base's load and a training process keep resident (dreambooth/resident.py): the pages of the
weights file a quantized weight was read from leave memory as it is quantized, with the same quantized result;
big freed allocations go back to the system. No model of the families is needed: a two-layer diffusers model and
glibc itself."""
import ctypes
import os
import subprocess
import sys

import pytest
import torch

from dreambooth import quantize, resident

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
glibc = pytest.mark.skipif(resident._libc() is None or not os.path.exists("/proc/self/smaps"),
                           reason="glibc on Linux only")


def mapped_kib(name):
    """Resident KiB of this process's mappings of files whose path ends with `name`."""
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            fields = line.split()
            if not fields[0].endswith(":"):  # a mapping's header line: address perms offset dev inode [path]
                inside = line.rstrip().endswith(name)
            elif inside and fields[0] == "Rss:":
                total += int(fields[1])
    return total


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    from diffusers import ConfigMixin, ModelMixin
    from diffusers.configuration_utils import register_to_config

    class Wide(ModelMixin, ConfigMixin):
        @register_to_config
        def __init__(self, width=512):
            super().__init__()
            self.proj = torch.nn.Linear(width, 4 * width)  # 4 MiB of fp32 weight, quantized; its bias is kept
            self.norm = torch.nn.LayerNorm(4 * width)

    folder = tmp_path_factory.mktemp("wide")
    torch.manual_seed(0)
    Wide().save_pretrained(folder)
    def loader(**q):
        return Wide.from_pretrained(folder, torch_dtype=torch.float32, **q)
    loader.file = str(folder / "diffusion_pytorch_model.safetensors")  # this file only: other tests' models stay mapped
    return loader


def load(loader):
    return quantize.load_quantized(loader, quantize.PRESETS["nf4"], torch.float32, torch.device("cpu"), "diffusers")


@glibc
def test_a_quantized_weight_leaves_the_file_pages_it_was_read_from_and_quantizes_the_same(wide, monkeypatch):
    dropped = []
    real = resident.drop_read_pages

    def spy(tensor):
        before = mapped_kib(wide.file)
        done = real(tensor)
        dropped.append((tuple(tensor.shape), done, before, mapped_kib(wide.file)))
        return done
    monkeypatch.setattr(resident, "drop_read_pages", spy)
    model = load(wide)
    # the weight only (not its bias, not the norm): 4 MiB read, then all but its edge pages gone from the mapping
    assert [d[:2] for d in dropped] == [((2048, 512), True)]
    assert dropped[0][2] >= 4096 and dropped[0][3] <= 64, dropped
    monkeypatch.setattr(resident, "drop_read_pages", lambda tensor: False)
    kept = load(wide)
    assert torch.equal(model.proj.weight.data, kept.proj.weight.data)
    assert torch.equal(model.proj.weight.quant_state.absmax, kept.proj.weight.quant_state.absmax)
    x = torch.randn(3, 512)
    assert torch.equal(model.norm(model.proj(x)), kept.norm(kept.proj(x)))


@glibc
def test_memory_that_is_not_a_mapped_file_is_never_dropped():
    heap = torch.arange(1 << 20, dtype=torch.float32)
    assert resident.drop_read_pages(heap) is False
    assert torch.equal(heap, torch.arange(1 << 20, dtype=torch.float32))
    assert resident.drop_read_pages(heap[::2]) is False  # not contiguous


FRAGMENT = """
import ctypes, sys
sys.path.insert(0, {root!r})
from dreambooth import resident
if sys.argv[1] == "fixed":
    assert resident.map_large_allocations()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
def anon_kib():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("RssAnon:"))
libc.free(libc.malloc(16 << 20))  # a freed 16 MiB block: glibc's threshold rises to it
base = anon_kib()
blocks, kept = [], []
for _ in range(40):  # 120 MiB of 3 MiB blocks, as a step's activations, each followed by a small one that stays
    blocks.append(libc.malloc(3 << 20))
    ctypes.memset(blocks[-1], 1, 3 << 20)
    kept.append(libc.malloc(256 << 10))
for b in blocks:
    libc.free(b)
print(anon_kib() - base)
"""


@glibc
def test_big_freed_allocations_go_back_to_the_system_once_large_ones_are_mapped(tmp_path):
    script = tmp_path / "fragment.py"
    script.write_text(FRAGMENT.format(root=ROOT))

    def kept_kib(mode):
        env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
        return int(subprocess.run([sys.executable, str(script), mode], capture_output=True, text=True, check=True,
                                  env=env).stdout)
    assert kept_kib("dynamic") > 100 * 1024  # glibc's default: the freed 120 MiB stays, in holes of the heap
    assert kept_kib("fixed") < 8 * 1024


def test_glibcs_own_threshold_setting_is_left_as_the_user_set_it(monkeypatch):
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    calls = []
    monkeypatch.setattr(resident, "_libc", lambda: calls.append(1) or ctypes.CDLL(None))
    assert resident.map_large_allocations() is False and not calls
