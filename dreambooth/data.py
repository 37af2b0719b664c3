"""Images in, training examples out: decode, orient, crop, flip, bucket, optionally cache latents.

Randomness (crop offsets, flips, batch order) is derived from (seed, epoch, index) rather than
a global RNG, so a resumed run sees exactly the examples an uninterrupted run would have seen,
whatever the number of DataLoader workers.
"""
import math
import os
import random

import numpy as np
import torch
from PIL import Image, ImageOps

from .images import caption_path, load_rgb, read_caption

RESAMPLE = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC,
            "lanczos": Image.LANCZOS, "box": Image.BOX, "hamming": Image.HAMMING}


def caption_for(image_path, default):
    """'photo.txt' beside 'photo.jpg' replaces the instance prompt for that image (an empty or
    undecodable caption file raises UsageError rather than training on the wrong prompt)."""
    path = caption_path(image_path)
    return read_caption(path) if os.path.isfile(path) else default


def crop_with_placement(image, size, center_crop, rng, resample, flip=False):
    """Scale so the image covers `size` (w, h), then crop to it (no padding, no distortion), optionally mirrored;
    and where the result came from: (original (h, w), crop corner
    (top, left) in the resized image). SDXL's UNet is conditioned on both (its "time ids"); a mirrored crop's
    corner is measured from the other side, as if the resized image had been flipped before cropping."""
    width, height = size
    original = (image.height, image.width)
    scale = max(width / image.width, height / image.height)
    new_w, new_h = max(width, round(image.width * scale)), max(height, round(image.height * scale))
    image = image.resize((new_w, new_h), resample=resample)
    if center_crop:
        left, top = (new_w - width) // 2, (new_h - height) // 2
    else:
        left, top = rng.randint(0, new_w - width), rng.randint(0, new_h - height)
    image = image.crop((left, top, left + width, top + height))
    if flip:
        image, left = ImageOps.mirror(image), new_w - width - left
    return image, (original, (top, left))


def to_tensor(image):
    """PIL RGB -> float tensor [3, H, W] in [-1, 1], the range SD's VAE expects."""
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def make_buckets(resolution, min_reso, max_reso, step):
    """Every (w, h) on the step grid with area <= resolution^2 and sides within [min_reso, max_reso]."""
    buckets = set()
    max_area = resolution * resolution
    for w in range(min_reso, max_reso + 1, step):
        h = min(max_reso, (max_area // w) // step * step)
        if h >= min_reso:
            buckets.add((w, h))
            buckets.add((h, w))
    return sorted(buckets)


def assign_bucket(image_size, buckets, step, min_reso):
    """Closest aspect ratio; never a bucket larger than the image itself (no upscaling) unless the
    image is smaller than the smallest allowed side."""
    w, h = image_size
    aspect = w / h
    best = min(buckets, key=lambda b: (abs(math.log(b[0] / b[1] / aspect)), -b[0] * b[1]))
    if best[0] <= w and best[1] <= h:
        return best
    scale = min(w / best[0], h / best[1])
    bw = max(min_reso, int(best[0] * scale) // step * step)
    bh = max(min_reso, int(best[1] * scale) // step * step)
    return (bw, bh)


class DreamBoothDataset(torch.utils.data.Dataset):
    """Index i is instance i % n_instances (and class image i % n_class with prior preservation),
    so one epoch shows every instance image `repeats` times and every class image at least once."""

    def __init__(self, instance_paths, instance_prompt, class_paths=(), class_prompt=None, resolution=512,
                 center_crop=False, random_flip=False, repeats=1, interpolation="lanczos", seed=0,
                 bucket_args=None, caption_dropout_rate=0.0):
        self.instance_paths = list(instance_paths)
        self.caption_dropout_rate = caption_dropout_rate
        self.class_paths = list(class_paths)
        self.center_crop, self.random_flip = center_crop, random_flip
        self.resample = RESAMPLE[interpolation]
        self.seed = seed or 0
        self.epoch = 0
        self.latents = None  # filled by cache_latents: {(path, size): (tensor [variants, ...], [placement])}
        self.bucketed = bool(bucket_args)
        captions = [caption_for(p, instance_prompt) for p in self.instance_paths]
        self.prompts = list(dict.fromkeys(captions + ([class_prompt] if self.class_paths else [])))
        self.instance_prompt_ids = [self.prompts.index(c) for c in captions]
        self.class_prompt_id = self.prompts.index(class_prompt) if self.class_paths else None
        # --caption_dropout_rate: an instance row's prompt is the empty one this often (its own row of the table, so
        # precomputed embeddings cover it)
        self.empty_prompt_id = None
        if caption_dropout_rate:
            self.prompts = list(dict.fromkeys(self.prompts + [""]))
            self.empty_prompt_id = self.prompts.index("")
        self.length = max(len(self.instance_paths) * repeats, len(self.class_paths))
        if bucket_args:
            buckets = make_buckets(resolution, *bucket_args)
            step, min_reso = bucket_args[2], bucket_args[0]
            self.instance_sizes = []
            for p in self.instance_paths:
                with Image.open(p) as im:
                    size = ImageOps.exif_transpose(im).size
                self.instance_sizes.append(assign_bucket(size, buckets, step, min_reso))
        else:
            self.instance_sizes = [(resolution, resolution)] * len(self.instance_paths)

    def __len__(self):
        return self.length

    def start_epoch(self, epoch):
        """Deliberately not named set_epoch: accelerate calls that with its own counter, which
        restarts at 0 in the loader skip_first_batches makes on resume. Only the main process's copy hears
        it: DataLoader workers keep theirs, hence the sampler also sends the epoch with every index."""
        self.epoch = epoch

    def size_of(self, index):
        return self.instance_sizes[index % len(self.instance_paths)]

    def _rng(self, index, salt, epoch):
        return random.Random(f"{self.seed}/{epoch}/{index}/{salt}")  # str seeds are stable across processes

    def _example(self, path, size, rng):
        """(pixels or latents, placement): what the UNet sees and where it came from."""
        flip = self.random_flip and rng.random() < 0.5
        if self.latents is not None:
            variants, placements = self.latents[(path, size)]
            k = 1 if flip and len(variants) > 1 else 0
            return variants[k], placements[k]
        image, placement = crop_with_placement(load_rgb(path), size, self.center_crop, rng, self.resample, flip)
        return to_tensor(image), placement

    def __getitem__(self, key):
        """key: an index, or (epoch, index) as BucketBatchSampler yields them."""
        epoch, index = key if isinstance(key, tuple) else (self.epoch, key)
        size = self.size_of(index)
        i = index % len(self.instance_paths)
        pixels, placement = self._example(self.instance_paths[i], size, self._rng(index, "instance", epoch))
        prompt_id = self.instance_prompt_ids[i]
        if self.caption_dropout_rate and self._rng(index, "caption", epoch).random() < self.caption_dropout_rate:
            prompt_id = self.empty_prompt_id
        example = {"instance": pixels, "instance_placement": placement, "target_size": (size[1], size[0]),
                   "instance_prompt_id": prompt_id}
        if self.class_paths:
            path = self.class_paths[index % len(self.class_paths)]
            example["class"], example["class_placement"] = self._example(path, size, self._rng(index, "class", epoch))
            example["class_prompt_id"] = self.class_prompt_id
        return example

    def crops_are_fixed(self):
        """True when caching loses no augmentation: centre crops, buckets (whose leftover is a few pixels, as
        kohya caches them), or every image already has its training shape, so a random crop has nowhere to go.
        Reads only the files' headers."""
        if self.center_crop or self.bucketed:
            return True
        pairs = [(p, self.instance_sizes[i]) for i, p in enumerate(self.instance_paths)]
        pairs += [(p, s) for s in set(self.instance_sizes) for p in self.class_paths]
        for path, (width, height) in pairs:
            with Image.open(path) as im:
                w, h = im.size
                if im.getexif().get(0x0112) in (5, 6, 7, 8):  # EXIF orientations that turn the image on its side
                    w, h = h, w
            scale = max(width / w, height / h)
            if max(width, round(w * scale)) != width or max(height, round(h * scale)) != height:
                return False
        return True

    def cache_latents(self, encode, batch_size=4):
        """Encode every (image, size) once, with its mirror when random_flip is on; `encode` gives what a step
        needs (the VAE posterior's moments). Crops are fixed at their centre (or one seeded random crop), as in
        kohya's cache_latents."""
        pairs = [(p, self.instance_sizes[i]) for i, p in enumerate(self.instance_paths)]
        if self.class_paths:
            pairs += [(p, s) for s in sorted(set(self.instance_sizes)) for p in self.class_paths]
        pairs = list(dict.fromkeys(pairs))
        cache = {}
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start:start + batch_size]
            by_size = {}
            for path, size in chunk:
                image = load_rgb(path)
                made = [crop_with_placement(image, size, self.center_crop, random.Random(f"{self.seed}/{path}"),
                                            self.resample, flip) for flip in ((False, True) if self.random_flip
                                                                              else (False,))]
                by_size.setdefault(size, []).append((path, torch.stack([to_tensor(im) for im, _ in made]),
                                                     [placement for _, placement in made]))
            for size, items in by_size.items():
                pixels = torch.cat([v for _, v, _ in items])
                latents = encode(pixels).cpu()
                n = len(items[0][1])
                for k, (path, _, placements) in enumerate(items):
                    cache[(path, size)] = (latents[k * n:(k + 1) * n], placements)
        self.latents = cache


class BucketBatchSampler(torch.utils.data.Sampler):
    """Batches drawn within one image size, shuffled by (seed, epoch) so resumes replay the order. Each item is
    (epoch, index): a DataLoader worker's copy of the dataset never hears start_epoch (persistent workers keep
    the copy they started with), so the epoch its crops and flips derive from travels with the index."""

    def __init__(self, dataset, batch_size, seed=0):
        self.dataset, self.batch_size, self.seed, self.epoch = dataset, batch_size, seed or 0, 0
        self.groups = {}
        for index in range(len(dataset)):
            self.groups.setdefault(dataset.size_of(index), []).append(index)

    def start_epoch(self, epoch):
        self.epoch = epoch
        self.dataset.start_epoch(epoch)

    def _batches(self):
        rng = random.Random(f"{self.seed}/{self.epoch}/order")
        batches = []
        for size in sorted(self.groups):
            indices = self.groups[size][:]
            rng.shuffle(indices)
            batches += [[(self.epoch, k) for k in indices[i:i + self.batch_size]]
                        for i in range(0, len(indices), self.batch_size)]
        rng.shuffle(batches)
        return batches

    def __iter__(self):
        return iter(self._batches())

    def __len__(self):
        return sum(math.ceil(len(g) / self.batch_size) for g in self.groups.values())


def collate(examples):
    """Instance examples first, then class examples: one tensor, one UNet call. "images" are pixels, or
    latents once cache_latents ran; "original_sizes", "crop_top_lefts" and "target_sizes" are (h, w) / (top,
    left) rows per image, for families that condition on them (SDXL)."""
    classes = [e for e in examples if "class" in e]
    images = [e["instance"] for e in examples] + [e["class"] for e in classes]
    prompt_ids = [e["instance_prompt_id"] for e in examples] + [e["class_prompt_id"] for e in classes]
    placements = [e["instance_placement"] for e in examples] + [e["class_placement"] for e in classes]
    targets = [e["target_size"] for e in examples] + [e["target_size"] for e in classes]
    return {"images": torch.stack(images), "prompt_ids": torch.tensor(prompt_ids, dtype=torch.long),
            "original_sizes": torch.tensor([p[0] for p in placements], dtype=torch.long),
            "crop_top_lefts": torch.tensor([p[1] for p in placements], dtype=torch.long),
            "target_sizes": torch.tensor(targets, dtype=torch.long)}
