"""Files on disk: written atomically with the user's umask, checked for space and writability before a run
commits to them, and sniffed for what they really are. One home for these, shared by the trainer, infer.py and
the examples. Stdlib only: the flag checks import it.
"""
import json
import os
import shutil
import struct
import tempfile

from .errors import UsageError
from .redaction import scrub


def _current_umask():
    mask = os.umask(0)  # the only way to read it is to set it; put it straight back
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~_current_umask()  # what open() would give: 0644 under the usual umask 022


def atomic_write(path, write):
    """write(tmp_path) then rename over `path`: readers see the old file or the new one, never half.
    mkstemp creates the file 0600; it gets the mode the user's umask gives, since ComfyUI or A1111 often
    run as another user and must be able to read what we write."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text(path, text):
    """Every text file a run writes (card, config.yaml, stats, checkpoint settings) goes through here: the Hub
    token is scrubbed from it by value, whatever carried it in."""
    text = scrub(text)

    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    atomic_write(path, write)


def writable_folder_problem(folder):
    """None if `folder` exists and we can create files in it, or could create it; else the reason."""
    probe = folder
    while probe and not os.path.exists(probe):
        probe = os.path.dirname(probe)
    probe = probe or "."
    if not os.path.isdir(probe):
        return f"{probe} is a file"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"{probe} is not writable by this user"
    return None


def sniff_weights_file(path):
    """What a single-file model or LoRA file really is, from its first bytes (no torch, no full read): None
    when it looks like what its name says, else the reason. A .ckpt is a torch zip or a pickle; a
    .safetensors starts with its header length and a JSON header that fits in the file."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if path.endswith(".safetensors"):
            if len(head) < 8:
                return f"is {size} bytes, too short for a safetensors file"
            (header_len,) = struct.unpack("<Q", head)
            if header_len > min(size - 8, 100 * 2**20):
                return "is not a safetensors file (no valid header; a text or HTML file saved under that name?)"
            try:
                header = json.loads(f.read(header_len))
            except ValueError:
                return "has a corrupt safetensors header"
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
            if 8 + header_len + end > size:
                return f"is truncated ({size} of {8 + header_len + end} bytes)"
            return None
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):
        return "is not a torch checkpoint (neither zip nor pickle; a text or HTML file saved under that name?)"
    return None


def safetensors_header(path):
    """A .safetensors file's JSON header ({tensor name: dtype, shape, offsets}, and "__metadata__"), read without
    torch or the tensors; None when the file is missing or not a readable safetensors file (sniff_weights_file
    says why)."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return None
            (header_len,) = struct.unpack("<Q", head)
            if header_len > min(os.path.getsize(path) - 8, 100 * 2**20):
                return None
            header = json.loads(f.read(header_len))
    except (OSError, ValueError):
        return None
    return header if isinstance(header, dict) else None


def safetensors_metadata(path):
    """The file's string metadata ({} when it has none or cannot be read)."""
    meta = (safetensors_header(path) or {}).get("__metadata__")
    return meta if isinstance(meta, dict) else {}


def add_safetensors_metadata(source, target, extra):
    """Copies a .safetensors file with more string metadata in its header. The tensors are copied as bytes:
    their offsets count from the end of the header, so a longer header moves nothing."""
    with open(source, "rb") as src:
        (header_len,) = struct.unpack("<Q", src.read(8))
        header = json.loads(src.read(header_len))
        header["__metadata__"] = {**header.get("__metadata__", {}), **extra}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the format pads the header to 8 bytes with spaces
        with open(target, "wb") as dst:
            dst.write(struct.pack("<Q", len(raw)) + raw)
            shutil.copyfileobj(src, dst, 2**20)


def check_free_space(folder, needed_bytes, what):
    """Fail early with the numbers instead of dying mid-save with a half-written file."""
    probe = folder
    while probe and not os.path.exists(probe):
        probe = os.path.dirname(probe) or "."
    free = shutil.disk_usage(probe or ".").free
    if free < needed_bytes:
        raise UsageError(f"not enough disk space in {folder} for {what}: need {needed_bytes / 2**20:.1f} MiB, "
                         f"{free / 2**20:.1f} MiB free; free some space or choose another --output_dir")
