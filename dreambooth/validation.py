"""Validation grids: the same seeds every time, so grids from successive steps are comparable. The pipeline
comes from the model family (families/base.py: sampling_pipeline)."""
import math

import torch
from PIL import Image

from .files import atomic_write


def image_grid(images):
    """A near-square grid of same-sized PIL images."""
    cols = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h), "white")
    for i, image in enumerate(images):
        grid.paste(image, ((i % cols) * w, (i // cols) * h))
    return grid


def save_png(image, path):
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


@torch.no_grad()
def run_validation(generate, device, prompt, num_images, resolution, seed, out_path, accelerator=None, step=0,
                   steps=25):
    """Same seed every time, so grids from successive steps are comparable. generate(**pipeline kwargs) -> PIL
    images (the model family's: it decodes in the VAE's own precision). prompt: {"prompt": text}, or the prompt
    already encoded ({pipeline keyword: tensor}: the family's sampling_embeddings)."""
    generator = torch.Generator(device=device).manual_seed(seed or 0)
    if "prompt" not in prompt:  # encoded once: one row per image (the pipelines do not repeat given embeddings)
        prompt, per_prompt = {k: v.expand(num_images, *v.shape[1:]) for k, v in prompt.items()}, 1
    else:
        per_prompt = num_images
    images = generate(**prompt, num_images_per_prompt=per_prompt, num_inference_steps=steps, height=resolution,
                      width=resolution, generator=generator)
    grid = image_grid(images)
    save_png(grid, out_path)
    if accelerator is not None:
        for tracker in accelerator.trackers:
            if tracker.name == "tensorboard":
                import numpy as np
                tracker.writer.add_images("validation", np.stack([np.asarray(i) for i in images]), step,
                                          dataformats="NHWC")
            elif tracker.name == "wandb":
                import wandb
                text = prompt.get("prompt", "validation prompt")
                tracker.log({"validation": [wandb.Image(i, caption=f"{k}: {text}") for k, i in enumerate(images)]},
                            step=step)
    return images
