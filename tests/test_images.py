"""dreambooth/images.py: every image mode people have decodes to the right 8-bit RGB (EXIF rotation, alpha,
greyscale, 16-bit, CMYK, animations), the image files listed, captions read in every encoding editors write (or
fail in one line), and check_images names the bad file; through the trainer, an unreadable class image or caption
is one line before any model loads."""
import codecs
import os
import re
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, fails_with
from dreambooth import data, images
from dreambooth.errors import UsageError
from dreambooth.images import list_images


def raw_png(path, array, color_type):
    """A 16-bit-per-sample PNG written byte by byte (Pillow cannot write 48/64-bit PNGs)."""
    height, width = array.shape[:2]

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    rows = b"".join(b"\x00" + array[y].astype(">u2").tobytes() for y in range(height))
    header = struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
                + chunk(b"IEND", b""))
    return path


def pixel(path, xy=(0, 0)):
    return images.load_rgb(path).getpixel(xy)


def test_16bit_grey_png_is_scaled_not_clipped_to_white(tmp_path):
    grey = np.tile(np.linspace(0, 65535, 16).astype(np.uint16), (8, 1))  # a ramp over the full 16-bit range
    grey[:, 1:4] = 128 * 257  # mid-grey in 16-bit
    Image.fromarray(grey).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as im:
        assert im.mode == "I;16"
        assert im.convert("RGB").getpixel((1, 0)) == (255, 255, 255)  # the old load_rgb: a white square
    out = images.load_rgb(tmp_path / "g16.png")
    assert out.mode == "RGB" and out.getpixel((1, 0)) == (128, 128, 128)
    assert out.getpixel((0, 0)) == (0, 0, 0) and out.getpixel((15, 0)) == (255, 255, 255)
    # the same through the other wide-integer modes Pillow uses (big-endian, and "I" from older Pillow/TIFF)
    big = Image.frombytes("I;16B", (4, 2), np.full((2, 4), 128 * 257, ">u2").tobytes())
    assert images._decode(big).getpixel((0, 0)) == (128, 128, 128)
    Image.fromarray(np.full((2, 4), 128 * 257, np.int32)).save(tmp_path / "i32.tif")
    assert pixel(tmp_path / "i32.tif") == (128, 128, 128)


def test_48_and_64_bit_png_keep_their_colour(tmp_path):
    rgb = np.zeros((4, 4, 3), np.uint16)
    rgb[...] = (200 * 257, 50 * 257 + 90, 100 * 257 - 40)  # low bytes vary: only the high byte counts
    assert all(abs(a - b) <= 1 for a, b in zip(pixel(raw_png(tmp_path / "rgb48.png", rgb, 2)), (200, 50, 100)))
    rgba = np.zeros((4, 4, 4), np.uint16)
    rgba[...] = (200 * 257, 50 * 257, 100 * 257, 32768)  # half transparent: halfway to white
    got = pixel(raw_png(tmp_path / "rgba64.png", rgba, 6))
    assert all(abs(a - b) <= 2 for a, b in zip(got, (227, 152, 177))), got
    la = np.zeros((4, 4, 2), np.uint16)
    la[...] = (128 * 257, 65535)
    assert pixel(raw_png(tmp_path / "la32.png", la, 4)) == (128, 128, 128)


def strip_adobe_marker(jpeg):
    """The same JPEG without its APP14 'Adobe' segment (Pillow writes it right after SOI)."""
    assert jpeg[2:4] == b"\xff\xee" and jpeg[6:11] == b"Adobe"
    return jpeg[:2] + jpeg[4 + struct.unpack(">H", jpeg[4:6])[0]:]


def test_cmyk_jpeg_colours_with_and_without_adobe_marker(tmp_path):
    colour = (200, 50, 100)
    Image.new("RGB", (16, 16), colour).convert("CMYK").save(tmp_path / "adobe.jpg", quality=100)
    assert all(abs(a - b) <= 3 for a, b in zip(pixel(tmp_path / "adobe.jpg"), colour))
    # Plain (non-inverted) CMYK, as written by tools that add no Adobe marker: Pillow saves inverted data,
    # so saving the inverted image stores the plain values of `colour`.
    plain = Image.new("RGB", (16, 16), colour).convert("CMYK").point(lambda v: 255 - v)
    plain.save(tmp_path / "tmp.jpg", quality=100)
    (tmp_path / "plain.jpg").write_bytes(strip_adobe_marker((tmp_path / "tmp.jpg").read_bytes()))
    with Image.open(tmp_path / "plain.jpg") as im:
        assert im.mode == "CMYK" and "adobe" not in im.info
        assert max(im.convert("RGB").getpixel((0, 0))) < 60  # what convert("RGB") alone gives: near black
    assert all(abs(a - b) <= 3 for a, b in zip(pixel(tmp_path / "plain.jpg"), colour))


def test_transparency_bilevel_and_float_modes(tmp_path):
    p = Image.new("P", (4, 4), 0)
    p.putpalette([255, 0, 0, 0, 0, 255])
    p.putpixel((1, 1), 1)
    p.save(tmp_path / "p.png", transparency=0)  # palette entry 0 (red) is transparent
    assert pixel(tmp_path / "p.png") == (255, 255, 255) and pixel(tmp_path / "p.png", (1, 1)) == (0, 0, 255)

    la = Image.new("LA", (4, 4), (50, 0))
    la.putpixel((1, 1), (50, 255))
    la.save(tmp_path / "la.png")
    assert pixel(tmp_path / "la.png") == (255, 255, 255) and pixel(tmp_path / "la.png", (1, 1)) == (50, 50, 50)

    bilevel = Image.new("1", (4, 4), 0)
    bilevel.putpixel((1, 1), 1)
    bilevel.save(tmp_path / "b.png")
    assert pixel(tmp_path / "b.png") == (0, 0, 0) and pixel(tmp_path / "b.png", (1, 1)) == (255, 255, 255)
    Image.new("L", (4, 4), 77).save(tmp_path / "l.png")
    assert pixel(tmp_path / "l.png") == (77, 77, 77)

    unit = np.full((2, 4), 0.5, np.float32)  # floats in 0..1 (convert("RGB") makes this black)
    Image.fromarray(unit).save(tmp_path / "f.tif")
    with Image.open(tmp_path / "f.tif") as im:
        assert im.mode == "F"
    assert pixel(tmp_path / "f.tif") == (128, 128, 128)
    Image.fromarray(unit * 200).save(tmp_path / "f255.tif")  # floats in 0..255 stay as they are
    assert pixel(tmp_path / "f255.tif") == (100, 100, 100)
    wide = np.array([[-1.0, 3.0]], np.float32)  # no convention fits: stretch the range used
    assert images._decode(Image.fromarray(wide)).getpixel((1, 0)) == (255, 255, 255)
    with pytest.raises(ValueError, match="NaN or infinite"):
        images._decode(Image.fromarray(np.array([[np.nan, 1]], np.float32)))


@pytest.mark.parametrize("ext", ["gif", "png", "webp"])
def test_animated_file_gives_first_frame_and_a_note(tmp_path, ext):
    path = str(tmp_path / f"anim.{ext}")
    red, blue = Image.new("RGB", (8, 8), (255, 0, 0)), Image.new("RGB", (8, 8), (0, 0, 255))
    red.save(path, save_all=True, append_images=[blue], duration=100, **({"lossless": True} if ext == "webp" else {}))
    assert images.load_rgb(path).getpixel((3, 3)) == (255, 0, 0)
    assert images.check_images([path], "--instance_data_dir") == [
        f"note: {path} is animated; training on its first frame"]
    red.save(tmp_path / f"still.{ext}")
    assert images.check_images([str(tmp_path / f"still.{ext}")], "--instance_data_dir") == []


def test_check_images_names_a_truncated_file_in_one_line(tmp_path):
    noise = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "full.jpg")
    full = (tmp_path / "full.jpg").read_bytes()
    broken = str(tmp_path / "broken.jpg")
    (tmp_path / "broken.jpg").write_bytes(full[: len(full) // 3])
    with Image.open(broken):
        pass  # opening (what a quick check does) succeeds; only decoding finds the damage
    with pytest.raises(UsageError) as e:
        images.check_images([str(tmp_path / "full.jpg"), broken], "--class_data_dir")
    message = str(e.value)
    assert "\n" not in message
    assert re.fullmatch(rf"--class_data_dir: cannot read image {re.escape(broken)} \(OSError: image file is "
                        r"truncated \(\d+ bytes not processed\)\); fix or remove the file", message), message
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(UsageError, match=r"^--instance_data_dir: cannot read image .*text.png \(UnidentifiedImage"):
        images.check_images([str(tmp_path / "text.png")], "--instance_data_dir")


def test_check_images_warns_about_tiny_images(tmp_path):
    paths = []
    for i in range(5):
        paths.append(str(tmp_path / f"small{i}.png"))
        Image.new("RGB", (200, 150)).save(paths[-1])
    Image.new("RGB", (300, 256)).save(tmp_path / "ok.png")  # shorter side 256 = 512/2: fine
    assert images.check_images([str(tmp_path / "ok.png")] + paths[:3], "--instance_data_dir", 512) == [
        f"warning: {p} is 200x150, far below --resolution 512; it will be upscaled and look soft" for p in paths[:3]]
    assert images.check_images(paths, "--instance_data_dir", 512) == [
        f"warning: 5 images are far below --resolution 512 (shorter side under 256) and will be upscaled and look "
        f"soft: {paths[0]} is 200x150; {paths[1]} is 200x150; {paths[2]} is 200x150; and 2 more"]
    assert images.check_images(paths, "--instance_data_dir") == []  # no resolution given: no size check


def test_read_caption_encodings_and_one_line_errors(tmp_path):
    text = "a photo of sks dög, 猫"
    cases = {"utf8.txt": text.encode() + b"\n", "bom.txt": codecs.BOM_UTF8 + text.encode(),
             "le.txt": codecs.BOM_UTF16_LE + text.encode("utf-16-le"),
             "be.txt": codecs.BOM_UTF16_BE + text.encode("utf-16-be") + "\r\n".encode("utf-16-be")}
    for name, raw in cases.items():
        (tmp_path / name).write_bytes(raw)
        assert images.read_caption(str(tmp_path / name)) == text, name

    def error(raw):
        path = tmp_path / "bad.txt"
        path.write_bytes(raw)
        with pytest.raises(UsageError) as e:
            images.read_caption(str(path))
        return str(e.value).replace(str(path), "P")
    assert error("café au lait".encode("latin-1")) == \
        "caption file P: not UTF-8 or UTF-16 text (byte 0xe9 at offset 3: invalid continuation byte); save it as UTF-8"
    assert error("a dog".encode("utf-16-le")) == "caption file P: not UTF-8 or UTF-16 text (it contains NUL bytes: " \
                                                "UTF-16 without a byte-order mark?); save it as UTF-8"
    empty = "caption file P is empty; write a caption in it, or delete it to use --instance_prompt for that image"
    assert error(b"") == empty and error(b" \n\t\r\n") == empty and error(codecs.BOM_UTF8 + b"  ") == empty


def test_captions_are_checked_up_front_and_used_by_the_dataset(tmp_path):
    for name in ("a", "b", "c"):
        Image.new("RGB", (8, 8)).save(tmp_path / f"{name}.png")
    (tmp_path / "a.txt").write_bytes(codecs.BOM_UTF8 + b"a photo of sks dog on grass\n")
    paths = images.list_images(str(tmp_path))
    assert images.check_captions(paths) == {paths[0]: "a photo of sks dog on grass"}
    assert [data.caption_for(p, "default") for p in paths] == ["a photo of sks dog on grass", "default", "default"]
    (tmp_path / "b.txt").write_text("   ")
    with pytest.raises(UsageError, match=f"caption file {re.escape(str(tmp_path / 'b.txt'))} is empty"):
        images.check_captions(paths)
    os.mkdir(tmp_path / "folder.png")  # a folder named like an image is not an image
    assert images.list_images(str(tmp_path)) == paths
    assert images.list_instance_images(str(tmp_path)) == (paths, 0, [str(tmp_path / "a.txt"), str(tmp_path / "b.txt")])


def test_images_module_does_not_import_torch():
    code = "import sys, dreambooth.images; print(sorted(m for m in ('torch', 'diffusers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]"


def test_exif_rotation_alpha_and_greyscale(tmp_path):
    im = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    im.save(tmp_path / "rot.jpg", exif=exif)
    assert data.load_rgb(tmp_path / "rot.jpg").size == (20, 40)

    rgba = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    rgba.save(tmp_path / "cut.png")
    loaded = data.load_rgb(tmp_path / "cut.png")
    assert loaded.mode == "RGB" and loaded.getpixel((0, 0)) == (255, 255, 255)  # transparent -> white

    Image.new("L", (8, 8), 128).save(tmp_path / "grey.bmp")
    assert data.load_rgb(tmp_path / "grey.bmp").getpixel((3, 3)) == (128, 128, 128)

    Image.new("RGB", (12, 10), (0, 200, 0)).save(tmp_path / "leaf.webp", lossless=True)
    assert data.load_rgb(tmp_path / "leaf.webp").getpixel((5, 5)) == (0, 200, 0)
    assert list_images(tmp_path) == [str(tmp_path / n) for n in ("cut.png", "grey.bmp", "leaf.webp", "rot.jpg")]



def test_unreadable_class_image_and_bad_captions(world, capsys):
    tmp_path, dog, out, argv = world
    classes = tmp_path / "classes"
    classes.mkdir()
    (classes / "mine.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    fails_with(world, capsys, f"--class_data_dir: cannot read image {classes}/mine.jpg (UnidentifiedImageError: "
               f"cannot identify image file '{classes}/mine.jpg'); fix or remove the file",
               with_prior_preservation=True, class_prompt="a photo of dog", class_data_dir=str(classes))
    (dog / "dog0.txt").write_bytes("a photo of sks dog, caf\u00e9".encode("utf-16"))  # with BOM: read fine
    (dog / "dog1.txt").write_bytes("caf\u00e9".encode("latin-1"))
    fails_with(world, capsys, f"caption file {dog}/dog1.txt: not UTF-8 or UTF-16 text (byte 0xe9 at offset 3: "
               "unexpected end of data); save it as UTF-8")
    (dog / "dog1.txt").write_text("  \n")
    fails_with(world, capsys, f"caption file {dog}/dog1.txt is empty; write a caption in it, or delete it to use "
               "--instance_prompt for that image")

