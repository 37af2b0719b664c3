"""Class-prior images: count what exists, generate only the missing ones, cache them by settings.

Generated files are named prior-<key>-<index>.png, where <key> hashes (model, prompt, steps, seed,
resolution, precision); a manifest priors-<key>.json records the settings. A later run with the
same settings finds them and generates nothing; other settings never pick them up. Images the
user put in the folder themselves (any other name) always count.
"""
import hashlib
import json
import os
import re
from typing import Any, Callable, NamedTuple

import torch
from tqdm.auto import tqdm

from .images import list_images
from .files import check_free_space, write_text
from .validation import save_png

GENERATED = re.compile(r"^prior-([0-9a-f]{10})-(\d{5,})\.png$")


def prior_settings(model, prompt, steps, seed, resolution, precision, components=None):
    """(settings, cache key) of a set of class images. components: what else decides the images besides the base
    model (--pretrained_vae_model_name_or_path, --revision, --variant), keyed in only when given, so the caches of
    runs without them keep their keys."""
    settings = {"model": str(model), "prompt": prompt, "steps": steps, "seed": seed or 0,
                "resolution": resolution, "precision": precision}
    settings.update({k: str(v) for k, v in (components or {}).items() if v})
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    return settings, key


class ClassImageSampler(NamedTuple):
    """What generating class images needs from the model family: a call that makes PIL images from pipeline
    keyword arguments, the precision context to run it under, and the prompt encoded once ({pipeline keyword:
    tensor [1, ...]})."""
    generate: Callable
    precision: Any
    embed: Callable


def generation_precision(modules, device, weight_dtype, gen_dtype):
    """Move the frozen modules to the device for class generation in --prior_generation_precision, without
    changing their weights: a cast is made only where it loses nothing (up to fp32, or to the dtype they are
    in); otherwise they stay as they are and generation runs under autocast. Casting fp32 weights to fp16
    and back for training (--mixed_precision no on CUDA) would train on weights rounded to fp16.
    Returns the context to generate under."""
    cast = gen_dtype if gen_dtype in (torch.float32, weight_dtype) else weight_dtype
    for module in modules:
        module.to(device, dtype=cast)
    return torch.autocast(torch.device(device).type, dtype=gen_dtype, enabled=cast != gen_dtype)


def existing_class_images(class_dir, key):
    """(user images, generated images for this key, indices already used for this key)."""
    user, generated, used = [], [], set()
    if os.path.isdir(class_dir):
        for path in list_images(class_dir):
            m = GENERATED.match(os.path.basename(path))
            if not m:
                user.append(path)
            elif m.group(1) == key:
                generated.append(path)
                used.add(int(m.group(2)))
    return user, generated, used


def ensure_class_images(sampler_factory, class_dir, num_images, settings, key, batch_size, accelerator):
    """Generate what is missing (split across processes) and return exactly num_images paths."""
    user, generated, used = existing_class_images(class_dir, key)
    missing = num_images - len(user) - len(generated)
    if missing > 0:
        indices, i = [], 0
        while len(indices) < missing:
            if i not in used:
                indices.append(i)
            i += 1
        if accelerator.is_main_process:
            os.makedirs(class_dir, exist_ok=True)
            check_free_space(class_dir, missing * settings["resolution"] ** 2 * 3, f"{missing} class images")
        accelerator.wait_for_everyone()
        mine = indices[accelerator.process_index::accelerator.num_processes]
        generate, precision, embed = sampler_factory()
        with precision:
            embeddings = embed(settings["prompt"])  # once: every batch reuses it
        with tqdm(total=missing, desc=f"Generating {missing} class images",
                  disable=not accelerator.is_local_main_process) as bar:  # closed on Ctrl-C too, before our line
            for start in range(0, len(mine), batch_size):
                chunk = mine[start:start + batch_size]
                # One generator per image, seeded by its index: the same image whatever the batching or GPUs.
                generators = [torch.Generator(device="cpu").manual_seed(settings["seed"] * 100003 + idx)
                              for idx in chunk]
                with precision:
                    images = generate(**{k: v.expand(len(chunk), *v.shape[1:]) for k, v in embeddings.items()},
                                      num_inference_steps=settings["steps"], height=settings["resolution"],
                                      width=settings["resolution"], generator=generators)
                for idx, image in zip(chunk, images):
                    save_png(image, os.path.join(class_dir, f"prior-{key}-{idx:05d}.png"))
                bar.update(len(chunk) * accelerator.num_processes)
        del generate
        accelerator.wait_for_everyone()
        user, generated, used = existing_class_images(class_dir, key)
        if accelerator.is_main_process:
            manifest = dict(settings, files=[os.path.basename(p) for p in generated])
            write_text(os.path.join(class_dir, f"priors-{key}.json"), json.dumps(manifest, indent=2))
    return (user + generated)[:num_images], max(missing, 0)
