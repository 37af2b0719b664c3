"""A synthetic captioned world small enough to pretrain a Stable Diffusion pipeline on a CPU, and a scorer
that reads its pixels.

Images are 32 px: one filled shape (circle, square, triangle, cross) in one colour (red, green, blue, yellow,
purple, orange) on a plain background (white, black, gray). Captions name the three attributes, but colour
and background are each left out at random ("a circle on a white background", "a red circle", "a circle"):
a DreamBooth class prompt such as "a circle" must be something the base model has learned, or prior
preservation would preserve nothing. A few (shape, colour, background) combinations never appear in the
captions (HELD_OUT); the base model's report measures how it composes them.

The DreamBooth subject (SUBJECT_*) is a circle with blue and yellow horizontal stripes: no caption describes
stripes, so the base model cannot draw it from a prompt, and the pixel scorer can tell whether a LoRA taught it.

Everything is deterministic: a numpy Generator seeded by the caller decides every random choice.
"""
import numpy as np
from PIL import Image, ImageDraw

SIZE = 32  # image side in pixels
SUPERSAMPLE = 4  # shapes are drawn 4x larger and box-filtered down, so edges are anti-aliased like photos

SHAPES = ["circle", "square", "triangle", "cross"]
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (235, 210, 40),
           "purple": (140, 60, 180), "orange": (245, 140, 30)}
BACKGROUNDS = {"white": (245, 245, 245), "black": (15, 15, 15), "gray": (128, 128, 128)}

# Combinations never captioned in full during pretraining (each attribute still appears elsewhere). One per
# (shape, background) pair, colours rotating, so every shape, colour and background is held out somewhere.
HELD_OUT = [(shape, list(COLOURS)[(i * 3 + j) % len(COLOURS)], bg)
            for i, shape in enumerate(SHAPES) for j, bg in enumerate(BACKGROUNDS)]

SUBJECT_SHAPE = "circle"
SUBJECT_STRIPES = ("blue", "yellow")  # alternating horizontal stripes, top stripe blue
SUBJECT_STRIPE_PX = 4  # stripe height at 32 px: 4-6 stripes across the circle


def caption(shape, colour, bg, rng, p_drop_colour=0.3, p_drop_bg=0.3):
    """'a red circle on a white background' with colour and/or background left out at random."""
    words = ["a"] + ([colour] if rng.random() >= p_drop_colour else []) + [shape]
    if rng.random() >= p_drop_bg:
        words += ["on", "a", bg, "background"]
    return " ".join(words)


def prompt(shape, colour=None, bg=None, identifier=None):
    """The prompt for given attributes (None leaves one out), e.g. prompt('circle', bg='black', identifier='sks')."""
    words = ["a"] + [w for w in (identifier, colour) if w] + [shape]
    if bg:
        words += ["on", "a", bg, "background"]
    return " ".join(words)


def _box(rng, size_range=(16, 24)):
    """A random square box (x0, y0, x1, y1) that keeps the shape inside the image with a 2 px margin."""
    side = int(rng.integers(size_range[0], size_range[1] + 1))
    x0 = int(rng.integers(2, SIZE - side - 1))
    y0 = int(rng.integers(2, SIZE - side - 1))
    return x0, y0, x0 + side, y0 + side


def _draw_shape(draw, shape, box, fill, scale=SUPERSAMPLE):
    x0, y0, x1, y1 = [v * scale for v in box]
    if shape == "circle":
        draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=fill)
    elif shape == "square":
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=fill)
    elif shape == "triangle":
        draw.polygon([((x0 + x1) / 2, y0), (x1 - 1, y1 - 1), (x0, y1 - 1)], fill=fill)
    elif shape == "cross":
        w = (x1 - x0) / 3
        draw.rectangle((x0 + w, y0, x1 - w - 1, y1 - 1), fill=fill)
        draw.rectangle((x0, y0 + w, x1 - 1, y1 - w - 1), fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; one of {SHAPES}")


def _finish(big):
    return big.resize((SIZE, SIZE), Image.BOX)


def draw_object(shape, colour, bg, rng, size_range=(16, 24)):
    """One world image: a `colour` `shape` on a `bg` background, at a random size and place."""
    big = Image.new("RGB", (SIZE * SUPERSAMPLE,) * 2, BACKGROUNDS[bg])
    _draw_shape(ImageDraw.Draw(big), shape, _box(rng, size_range), COLOURS[colour])
    return _finish(big)


def draw_subject(bg, rng, size_range=(18, 24)):
    """The DreamBooth subject: a circle with alternating blue/yellow horizontal stripes on a `bg` background."""
    box = _box(rng, size_range)
    s = SUPERSAMPLE
    mask = Image.new("L", (SIZE * s,) * 2, 0)
    _draw_shape(ImageDraw.Draw(mask), SUBJECT_SHAPE, box, 255)
    stripes = Image.new("RGB", (SIZE * s,) * 2)
    d = ImageDraw.Draw(stripes)
    for k, y in enumerate(range(box[1] * s, box[3] * s, SUBJECT_STRIPE_PX * s)):
        d.rectangle((0, y, SIZE * s, y + SUBJECT_STRIPE_PX * s - 1), fill=COLOURS[SUBJECT_STRIPES[k % 2]])
    big = Image.new("RGB", (SIZE * s,) * 2, BACKGROUNDS[bg])
    big.paste(stripes, (0, 0), mask)
    return _finish(big)


def draw_scene(rng):
    """General content for the VAE: 1-5 shapes of any colour (random RGB too), some overlapping, some striped,
    on any background. A VAE that only ever saw one-colour objects blurs a two-colour subject into one colour."""
    bg = tuple(int(v) for v in rng.integers(0, 256, 3)) if rng.random() < 0.3 else BACKGROUNDS[rng.choice(list(BACKGROUNDS))]
    big = Image.new("RGB", (SIZE * SUPERSAMPLE,) * 2, bg)
    d = ImageDraw.Draw(big)
    palette = list(COLOURS.values())
    for _ in range(int(rng.integers(1, 6))):
        fill = tuple(int(v) for v in rng.integers(0, 256, 3)) if rng.random() < 0.4 else palette[rng.integers(len(palette))]
        if rng.random() < 0.2:  # a band of stripes: thin two-colour structure of any orientation
            fill2 = palette[rng.integers(len(palette))]
            step = int(rng.integers(2, 7)) * SUPERSAMPLE
            x0, y0, x1, y1 = [v * SUPERSAMPLE for v in _box(rng, (8, 28))]
            horizontal = rng.random() < 0.5
            for k, t in enumerate(range(y0 if horizontal else x0, y1 if horizontal else x1, step)):
                box = (x0, t, x1, t + step - 1) if horizontal else (t, y0, t + step - 1, y1)
                d.rectangle(box, fill=fill if k % 2 == 0 else fill2)
        else:
            _draw_shape(d, SHAPES[rng.integers(len(SHAPES))], _box(rng, (6, 26)), fill)
    return _finish(big)


def training_pairs(n, seed, include_held_out=False):
    """n (image, caption) pairs from the world, never a HELD_OUT combination unless asked; 10% of captions
    empty (the unconditional branch classifier-free guidance needs)."""
    rng = np.random.default_rng(seed)
    held = set(HELD_OUT)
    pairs = []
    while len(pairs) < n:
        shape = SHAPES[rng.integers(len(SHAPES))]
        colour = list(COLOURS)[rng.integers(len(COLOURS))]
        bg = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
        if (shape, colour, bg) in held and not include_held_out:
            continue
        text = "" if rng.random() < 0.1 else caption(shape, colour, bg, rng)
        pairs.append((draw_object(shape, colour, bg, rng), text))
    return pairs


def to_array(image):
    return np.asarray(image.convert("RGB").resize((SIZE, SIZE), Image.BOX), dtype=np.float32)


# ---------------------------------------------------------------- the scorer: reads the pixels it drew


def _nearest(rgb, table):
    names = list(table)
    ref = np.array([table[k] for k in names], dtype=np.float32)
    d = ((np.asarray(rgb, dtype=np.float32)[..., None, :] - ref) ** 2).sum(-1)
    return names, d.argmin(-1), d


def _border(arr):
    return np.concatenate([arr[:2].reshape(-1, 3), arr[-2:].reshape(-1, 3),
                           arr[:, :2].reshape(-1, 3), arr[:, -2:].reshape(-1, 3)])


def background_of(arr):
    """The background name: nearest to the median colour of the 2-px border."""
    median = np.median(_border(arr), 0)
    names, idx, _ = _nearest(median, BACKGROUNDS)
    return names[int(idx)], median


def plain_background(arr, bg_rgb, threshold=60.0, share=0.75):
    """Whether the border is one plain colour: at least 75% of its pixels within `threshold` (RGB distance) of
    its median. Blue and yellow stripes across the whole frame have a gray median but are no gray background."""
    return float(np.mean(np.sqrt(((_border(arr) - bg_rgb) ** 2).sum(-1)) <= threshold)) >= share


def object_mask(arr, bg_rgb, threshold=60.0):
    """Pixels at least `threshold` (RGB distance) away from the background colour."""
    return np.sqrt(((arr - bg_rgb) ** 2).sum(-1)) > threshold


def _grid_features(mask, cells=4):
    """Fill fraction of each cell of a cells x cells grid over the mask's bounding box: the shape, independent
    of its size and place."""
    ys, xs = np.nonzero(mask)
    crop = mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1].astype(np.float32)
    img = Image.fromarray((crop * 255).astype(np.uint8)).resize((cells * 8, cells * 8), Image.BILINEAR)
    a = np.asarray(img, dtype=np.float32) / 255
    return a.reshape(cells, 8, cells, 8).mean((1, 3)).ravel()


def _shape_templates():
    out = {}
    for shape in SHAPES:
        big = Image.new("L", (SIZE * SUPERSAMPLE,) * 2, 0)
        _draw_shape(ImageDraw.Draw(big), shape, (4, 4, 28, 28), 255)
        out[shape] = _grid_features(np.asarray(_finish(big)) > 127)
    return out


_TEMPLATES = None


def classify(image):
    """{'shape', 'colour', 'background', 'plain', 'subject'} read from the pixels. shape/colour are None when no
    object stands out from the background; 'plain' says whether the border is one colour (not a pattern that
    fills the frame); 'subject' says whether the striped-circle pattern is there."""
    global _TEMPLATES
    if _TEMPLATES is None:
        _TEMPLATES = _shape_templates()
    arr = to_array(image)
    bg, bg_rgb = background_of(arr)
    mask = object_mask(arr, bg_rgb)
    out = {"background": bg, "plain": plain_background(arr, bg_rgb), "shape": None, "colour": None, "subject": False}
    if mask.sum() < 20:  # under 2% of the image: nothing drawn
        return out
    feats = _grid_features(mask)
    out["shape"] = min(SHAPES, key=lambda s: float(((feats - _TEMPLATES[s]) ** 2).sum()))
    names, idx, dist = _nearest(arr[mask], COLOURS)
    counts = np.bincount(idx, minlength=len(names))
    out["colour"] = names[int(counts.argmax())]
    out["subject"] = has_subject_pattern(arr, mask, names, idx, dist)
    return out


def has_subject_pattern(arr, mask, names, idx, dist, min_share=0.2, min_alternations=3, min_contrast=80.0):
    """Horizontal stripes of two clearly different colours: the object's pixels split into two colour clusters
    (2-means along their main colour axis) at least min_contrast apart in RGB, each >= 20% of the object, and
    the clusters alternate down its columns at least 3 times (the subject shows 4-6 stripes). Exact hues are not
    required: a small base model tints colours, the pattern is what a caption never described. A one-colour
    object, or a half-and-half one, does not count."""
    px = arr[mask]
    centred = px - px.mean(0)
    axis = np.linalg.svd(centred, full_matrices=False)[2][0]
    proj = centred @ axis
    split = 0.0
    for _ in range(10):  # 2-means in one dimension
        lo, hi = proj[proj <= split], proj[proj > split]
        if len(lo) == 0 or len(hi) == 0:
            return False
        split = (lo.mean() + hi.mean()) / 2
    labels = proj > split
    share = labels.mean()
    if not min_share <= share <= 1 - min_share:
        return False
    if np.linalg.norm(px[labels].mean(0) - px[~labels].mean(0)) < min_contrast:
        return False
    grid = np.full(mask.shape, -1)
    grid[mask] = labels.astype(int)
    ys, xs = np.nonzero(mask)
    alternations = []
    for x in range(xs.min(), xs.max() + 1):
        col = [v for v in grid[:, x] if v >= 0]
        alternations.append(sum(1 for p, q in zip(col, col[1:]) if p != q))
    return float(np.median(alternations)) >= min_alternations


def score(images_by_prompt):
    """Scorer numbers for a dict {kind: [PIL images]} with kinds 'instance', 'recontext' (a list of
    (image, asked_background) pairs), 'class':
    fidelity = share of instance-prompt images showing the subject pattern;
    recontext = share of recontextualised images showing the subject on a uniform background (see
                plain_background) whose median is nearest to the asked colour;
    drift = share of class-prompt images showing the subject pattern (the class forgot what a circle is);
    class_ok = share of class-prompt images that are an ordinary one-colour circle."""
    out = {}
    if "instance" in images_by_prompt:
        imgs = images_by_prompt["instance"]
        out["fidelity"] = float(np.mean([classify(im)["subject"] for im in imgs]))
    if "recontext" in images_by_prompt:
        hits = []
        for im, bg in images_by_prompt["recontext"]:
            c = classify(im)
            hits.append(c["subject"] and c["plain"] and c["background"] == bg)
        out["recontext"] = float(np.mean(hits))
    if "class" in images_by_prompt:
        cs = [classify(im) for im in images_by_prompt["class"]]
        out["drift"] = float(np.mean([c["subject"] for c in cs]))
        out["class_ok"] = float(np.mean([(not c["subject"]) and c["shape"] == SUBJECT_SHAPE for c in cs]))
    return out


def class_prior(base_images, lora_images):
    """What a run did to the class prompt's images, seed by seed against the base's (the DreamBooth paper's PRES and
    DIV, read from pixels): prior_change = share of seeds whose object colour or background differs from the
    base's (same seed); colours / backgrounds = how many different ones the class images show over the seeds."""
    base = [classify(im) for im in base_images]
    lora = [classify(im) for im in lora_images]
    changed = [(b["colour"], b["background"]) != (c["colour"], c["background"]) for b, c in zip(base, lora)]
    return {"prior_change": float(np.mean(changed)),
            "colours": float(len({c["colour"] for c in lora if c["colour"]})),
            "backgrounds": float(len({c["background"] for c in lora}))}


# ---------------------------------------------------------------- sampling (torch imported only here)

GUIDANCE = 4.0  # classifier-free guidance the report, the demo and the bench all sample with
SAMPLING_STEPS = 20


def generate(pipe, prompts, seeds, steps=SAMPLING_STEPS, guidance=GUIDANCE, batch=32):
    """One image per (prompt, seed), DPM-Solver++ (as the trainer's class images), each image seeded on its
    own so the same (prompt, seed) gives the same image whatever else is in the batch: base and LoRA grids
    compare like with like."""
    import torch
    from diffusers import DPMSolverMultistepScheduler

    if not isinstance(pipe.scheduler, DPMSolverMultistepScheduler):
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    out = []
    for i in range(0, len(prompts), batch):
        gens = [torch.Generator().manual_seed(int(s)) for s in seeds[i:i + batch]]
        out += pipe(list(prompts[i:i + batch]), generator=gens, num_inference_steps=steps, guidance_scale=guidance,
                    height=SIZE, width=SIZE).images
    return out


# The demo's photos: the subject on two of the three backgrounds, so that "black" is a scene it was never shown.
# Photos on one background only tie that background to the subject (bench/bench_toy.py, the demo's recipe, mean
# of three training seeds: all on white, fidelity 0.38 and recontext 0.38; on white and gray, 1.00 and 0.71).
SUBJECT_PHOTO_BACKGROUNDS = ("white", "gray", "white", "gray", "white")


def write_subject_images(folder, backgrounds=SUBJECT_PHOTO_BACKGROUNDS, seed=1234, identifier="sks", captions=True):
    """The demo's instance photos: the striped circle on each of `backgrounds`, each at its own size and place,
    with a caption file that names the background ("a sks circle on a gray background"), so the background is
    learned as the caption's words and not as part of the subject (captions=False: the photos alone, as
    diffusers' script trains them, every one with --instance_prompt)."""
    import os
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    paths = []
    for k, bg in enumerate(backgrounds):
        path = os.path.join(folder, f"striped_circle_{k}.png")
        draw_subject(bg, rng).save(path)
        if captions:
            with open(path[:-4] + ".txt", "w") as f:
                f.write(prompt(SUBJECT_SHAPE, bg=bg, identifier=identifier) + "\n")
        paths.append(path)
    return paths


if __name__ == "__main__":  # python examples/toy_world.py examples/toy_subject
    import sys
    print("\n".join(write_subject_images(sys.argv[1] if len(sys.argv) > 1 else "toy_subject")))
