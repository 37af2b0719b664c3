"""What stays in this process's resident memory once it is no longer used (Linux with glibc; elsewhere each of
these does nothing).

The C heap: glibc serves a request above its mmap threshold with a mapping of its own, unmapped on free; smaller
ones come from the heap, which keeps what is freed for reuse and gives back only its free top. The threshold
starts at 128 KiB, but each time a mapped block is freed it rises to that block's size (up to 32 MiB): after the
first transient activation or dequantized weight of a training step is freed, every later one of that size is
carved from the heap, and a step allocates and frees hundreds of them in changing orders. The heap then keeps
memory no tensor uses (measured on bench/bench_quantize.py's 0.64B-parameter transformer, 64 px: the steps grew
resident memory by 1.5 GB where the tensors saved for backward take 0.53 GB). A fixed threshold keeps big tensors
in mappings of their own.

A weights file read through a mapping (safetensors does): every page read stays resident while any tensor of the
file is alive. Where the loader turns what it read into something else (a quantizer packing fp32 weights into
4 bits), the pages read are dropped; the file stays mapped and an access reads them again.
"""
import ctypes
import os

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter (malloc.h)
MADV_DONTNEED = 4  # Linux's madvise advice (mman.h)
# Small allocations (Python objects, small tensors) stay in the heap, where they are cheapest; activations and
# weights of real models are far above this.
THRESHOLD = 1 << 20


def _libc():
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:  # not glibc
        return None
    return libc if all(hasattr(libc, f) for f in ("mallopt", "malloc_trim", "madvise")) else None


def map_large_allocations(threshold=THRESHOLD):
    """Allocations of at least `threshold` bytes get their own mapping from now on (see the module's note), unless
    glibc's own MALLOC_MMAP_THRESHOLD_ says otherwise (then it is left as set there). The cost: every big tensor's
    pages are fresh ones, zeroed by the kernel (measured on the same model: about 2 s of system time in a 25 s CPU
    step). True where this took effect."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    libc = _libc()
    return bool(libc and libc.mallopt(M_MMAP_THRESHOLD, threshold))


def trim():
    """Gives the heap's free pages back to the system (after a load frees what it read)."""
    libc = _libc()
    if libc:
        libc.malloc_trim(0)


def _file_mapping(start, end):
    """True when [start, end) lies in one mapping of a regular file (not a library's code) in this process."""
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                fields = line.split(maxsplit=5)
                low, high = (int(x, 16) for x in fields[0].split("-"))
                if low <= start < high:
                    return end <= high and fields[4] != "0" and "x" not in fields[1]
    except (OSError, ValueError, IndexError):
        pass
    return False


def drop_read_pages(tensor):
    """The whole pages of a contiguous CPU tensor that is a view of a mapped file leave this process's resident
    memory (the kernel may keep them in its page cache; an access reads them again). For a tensor whose contents
    are no longer needed: the source of a weight that was quantized. Anything else (heap memory, a GPU tensor) is
    left alone. True where pages were dropped."""
    libc = _libc()
    if libc is None or tensor.device.type != "cpu" or not tensor.is_contiguous():
        return False
    page = os.sysconf("SC_PAGE_SIZE")
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    first, last = -(-start // page) * page, end // page * page  # inward: the pages shared with neighbours stay
    if last <= first or not _file_mapping(start, end):
        return False
    return libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), MADV_DONTNEED) == 0
