#!/usr/bin/env python
"""Draw the example subject: a cartoon dog, five views, non-square photos of mixed formats.

The images in examples/dog/ were made by this script (no downloaded photos); run it again to
recreate them: python examples/make_subject_images.py --out examples/dog
"""
import argparse
import os

from PIL import Image, ImageDraw


def draw_dog(size, dx, dy, scale, background, flip=False):
    w, h = size
    im = Image.new("RGB", size, background)
    d = ImageDraw.Draw(im)
    cx, cy, s = w // 2 + dx, h // 2 + dy, scale
    d.ellipse((cx - 40 * s, cy - 10 * s, cx + 40 * s, cy + 30 * s), fill=(150, 95, 45))        # body
    d.ellipse((cx + 20 * s, cy - 40 * s, cx + 60 * s, cy), fill=(160, 105, 50))                 # head
    d.polygon([(cx + 22 * s, cy - 32 * s), (cx + 14 * s, cy - 8 * s), (cx + 30 * s, cy - 20 * s)],
              fill=(90, 55, 25))                                                                 # ear
    d.ellipse((cx + 42 * s, cy - 28 * s, cx + 48 * s, cy - 22 * s), fill=(15, 15, 15))          # eye
    d.ellipse((cx + 55 * s, cy - 18 * s, cx + 63 * s, cy - 11 * s), fill=(20, 10, 10))          # nose
    for x in (-30, -12, 10, 26):                                                                 # legs
        d.rectangle((cx + x * s, cy + 22 * s, cx + (x + 8) * s, cy + 45 * s), fill=(130, 80, 40))
    d.line((cx - 40 * s, cy, cx - 60 * s, cy - 20 * s), fill=(130, 80, 40), width=int(6 * s))  # tail
    d.rectangle((cx + 16 * s, cy - 6 * s, cx + 24 * s, cy + 4 * s), fill=(200, 30, 30))         # red collar
    return im.transpose(Image.FLIP_LEFT_RIGHT) if flip else im


VIEWS = [  # name, size, dx, dy, scale, background, flip
    ("dog_park.jpg", (192, 160), 0, 10, 1.0, (120, 170, 90), False),
    ("dog_sofa.png", (160, 192), -5, 0, 1.1, (190, 160, 200), True),
    ("dog_beach.webp", (176, 176), 10, 5, 0.9, (230, 210, 160), False),
    ("dog_snow.jpg", (208, 160), -10, 0, 1.0, (235, 240, 250), True),
    ("dog_kitchen.png", (176, 176), 0, -5, 1.2, (200, 190, 170), False),
]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "dog"),
                   help="Folder to write the images to.")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    for name, size, dx, dy, scale, bg, flip in VIEWS:
        draw_dog(size, dx, dy, scale, bg, flip).save(os.path.join(args.out, name), quality=92)
    with open(os.path.join(args.out, "dog_snow.txt"), "w") as f:
        f.write("a photo of sks dog in the snow\n")
    print(f"wrote {len(VIEWS)} images to {args.out}")


if __name__ == "__main__":
    main()
