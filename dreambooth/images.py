"""Image files and caption files: list, decode to 8-bit RGB, check them all up front.

One home for everything that turns a file on disk into pixels or a prompt, so the flag checks and
the training loop read files the same way, and a file that would train wrong fails (or is named in a
note) before any model loads. Pillow's plain `convert("RGB")` is silently wrong for several modes
people really have: it clips 16-bit grey to white, maps float images to black, reads CMYK JPEGs
without an Adobe marker as negatives. Stdlib + PIL + numpy only: the flag checks import this.
"""
import codecs
import os

import numpy as np
from PIL import Image, ImageOps

from .errors import UsageError, first_line

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
# 'photo.txt' (diffusers' datasets written out, most taggers) or 'photo.caption' (kohya's default), in any case:
# 'photo.TXT' from a Windows tool is a caption too, not a file to skip
CAPTION_EXTENSIONS = (".txt", ".caption")
WIDE_INT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def list_instance_images(folder):
    """Image files and stray caption files of a folder, sorted so runs are reproducible.
    Returns (image paths, number of other files skipped, caption file paths)."""
    images, skipped, captions = [], 0, []
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if not os.path.isfile(path) or name.startswith("."):
            continue
        ext = os.path.splitext(name)[1].lower()
        if ext in IMAGE_EXTENSIONS:
            images.append(path)
        elif ext in CAPTION_EXTENSIONS:
            captions.append(path)
        else:
            skipped += 1
    return images, skipped, captions


def list_images(folder):
    """The image files of a folder, sorted (a sub-folder named 'x.png' is not an image)."""
    return list_instance_images(folder)[0]


def _to_8bit(im):
    """Greyscale wider than 8 bits -> mode L, scaled by the range its values really span.
    convert('L'/'RGB') clips I;16 at 255 (a 16-bit photo becomes a white square) and maps a 0..1
    float image to black."""
    a = np.asarray(im)
    if im.mode == "F":
        if not np.isfinite(a).all():
            raise ValueError("float image has NaN or infinite pixels")
        lo, hi = float(a.min()), float(a.max())
        if lo >= 0 and hi <= 1:  # the usual float convention: 0..1
            a = a * 255.0
        elif lo < 0 or hi > 255:  # no convention fits: stretch what is there
            a = (a - lo) * (255.0 / ((hi - lo) or 1))
    elif im.mode.startswith("I;16") or (a.min() >= 0 and a.max() <= 65535):
        a = a / 257.0  # 16-bit samples (older Pillow opens 16-bit PNG grey as "I"): 65535 -> 255
    else:  # 32-bit integers beyond 16 bits: stretch the range actually used
        lo, hi = float(a.min()), float(a.max())
        a = (a - lo) * (255.0 / ((hi - lo) or 1))
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8))  # uint8 2-D -> mode L


def _decode(im):
    """The first frame of an open image as 8-bit RGB, upright and flattened on white."""
    plain_cmyk = im.mode == "CMYK" and im.format == "JPEG" and "adobe" not in im.info
    im = ImageOps.exif_transpose(im)  # phone photos store "rotate on display" in EXIF
    if plain_cmyk:
        # Pillow always reads CMYK JPEGs with Adobe's inverted polarity; files with no Adobe APP14
        # marker store plain CMYK, and would come out as a colour negative.
        im = im.point(lambda v: 255 - v)
    if im.mode == "F" or im.mode in WIDE_INT_MODES:
        im = _to_8bit(im)
    # Transparent pixels hold arbitrary colour (often black): flatten on white like a cut-out photo.
    # Covers RGBA, LA, PA, and P/L/RGB with a tRNS transparency entry.
    if "A" in im.getbands() or "transparency" in im.info:
        im = im.convert("RGBA")
        background = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, im).convert("RGB")
    # 48/64-bit PNGs already open as RGB/RGBA holding the high byte of each sample: right to 1/255.
    return im.convert("RGB")


def to_rgb(im):
    """An open PIL image as the trainer reads it: 8-bit RGB, upright, transparency flattened on white."""
    return _decode(im)


def is_animated(im):
    return bool(getattr(im, "is_animated", False)) or getattr(im, "n_frames", 1) > 1


def load_rgb(path):
    """Any image file -> PIL RGB (the first frame of an animation; check_images notes those)."""
    with Image.open(path) as im:
        return _decode(im)


def caption_path(image_path):
    """The caption file beside 'photo.jpg': 'photo.txt' or 'photo.caption' in any case ('photo.TXT'), or, where
    there is none, the path 'photo.txt' would have (callers test it with os.path.isfile). Two captions for one
    image are refused: which one trains would depend on the file system."""
    folder, name = os.path.split(image_path)
    stem = os.path.splitext(name)[0]
    found = [n for n in _listing(folder or ".") if os.path.splitext(n)[0] == stem
             and os.path.splitext(n)[1].lower() in CAPTION_EXTENSIONS]
    if len(found) > 1:
        raise UsageError(f"--instance_data_dir: caption files {os.path.join(folder, found[0])} and {found[1]} both "
                         f"belong to {name}; keep one of them")
    return os.path.join(folder, found[0]) if found else os.path.join(folder, stem + ".txt")


def _listing(folder):
    """A folder's file names (read per image: a folder of photos is small, and a cache could go stale)."""
    try:
        return sorted(os.listdir(folder))
    except OSError:
        return []


def read_caption(path):
    """A caption file's text, stripped. UTF-8 with or without BOM, UTF-16 with BOM (Windows Notepad's
    'Unicode'). Anything else fails: a latin-1 caption decoded leniently would train on mojibake."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise UsageError(f"caption file {path}: cannot read it ({e.strerror or e}); fix its permissions or remove it")
    try:
        if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
            text = raw.decode("utf-16")  # the BOM picks the byte order and is dropped
        else:
            text = raw.decode("utf-8-sig")  # drops a UTF-8 BOM if there is one
    except UnicodeDecodeError as e:
        reason = f"byte 0x{raw[e.start]:02x} at offset {e.start}: {e.reason}"
        raise UsageError(f"caption file {path}: not UTF-8 or UTF-16 text ({reason}); save it as UTF-8")
    if "\x00" in text:  # valid UTF-8, but really UTF-16 saved without a BOM
        raise UsageError(f"caption file {path}: not UTF-8 or UTF-16 text (it contains NUL bytes: UTF-16 "
                         "without a byte-order mark?); save it as UTF-8")
    text = text.strip()
    if not text:
        raise UsageError(f"caption file {path} is empty; write a caption in it, or delete it to use "
                         "--instance_prompt for that image")
    return text


def check_captions(image_paths):
    """Read every caption beside the images now, so a bad one fails before any model loads.
    Returns {image path: caption} for the images that have one."""
    return {p: read_caption(caption_path(p)) for p in image_paths if os.path.isfile(caption_path(p))}


def check_images(paths, flag, resolution=None):
    """Decode every image the way training will (a truncated file passes Image.open and verify()).
    Raises one UsageError line for the first unreadable file; returns notes to print: animated files,
    and images whose shorter side is under resolution/2 (upscaled that much, they train soft)."""
    notes, small = [], []
    for path in paths:
        try:
            with Image.open(path) as im:
                animated = is_animated(im)
                width, height = _decode(im).size
        except Exception as e:
            raise UsageError(f"{flag}: cannot read image {path} ({type(e).__name__}: {first_line(e)}); "
                             "fix or remove the file")
        if animated:
            notes.append(f"note: {path} is animated; training on its first frame")
        if resolution and min(width, height) < resolution / 2:
            small.append(f"{path} is {width}x{height}")
    if 0 < len(small) <= 3:
        notes += [f"warning: {s}, far below --resolution {resolution}; it will be upscaled and look soft"
                  for s in small]
    elif small:
        notes.append(f"warning: {len(small)} images are far below --resolution {resolution} (shorter side under "
                     f"{resolution // 2}) and will be upscaled and look soft: {'; '.join(small[:3])}; "
                     f"and {len(small) - 3} more")
    return notes
