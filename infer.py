#!/usr/bin/env python
"""Generate images with a base Stable Diffusion model plus one or more LoRAs.

    python infer.py --base stable-diffusion-v1-5/stable-diffusion-v1-5 --lora work_dirs/sd15_dog \
        --prompt "a photo of sks dog in a bucket" --num_images 4

--lora takes a training output folder, a checkpoint-N folder, or any LoRA .safetensors file
(diffusers or kohya/A1111 layout). Writes <output>/<prompt index>-<image index>.png and grid.png.
"""
import argparse
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from dreambooth.config import OneLineParser, UsageError, missing_model_path  # noqa: E402  (stdlib-only: --help stays instant)

SCHEDULERS = {"dpm++": "DPMSolverMultistepScheduler", "euler": "EulerDiscreteScheduler",
              "euler_a": "EulerAncestralDiscreteScheduler", "ddim": "DDIMScheduler", "pndm": "PNDMScheduler",
              "unipc": "UniPCMultistepScheduler", "default": None}


def build_parser():
    p = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="Base model: hub id, diffusers folder, or .safetensors/.ckpt file.")
    p.add_argument("--lora", action="append", default=[],
                   help="LoRA folder or .safetensors file; repeat to stack several.")
    p.add_argument("--lora_scale", action="append", type=float, default=[],
                   help="Strength of each --lora, in the same order (default 1.0 each).")
    p.add_argument("--prompt", action="append", required=True, help="Prompt; repeat for several.")
    p.add_argument("--negative_prompt", default=None, help="Negative prompt for every image.")
    p.add_argument("--num_images", type=int, default=4, help="Images per prompt.")
    p.add_argument("--steps", type=int, default=30, help="Denoising steps.")
    p.add_argument("--guidance_scale", type=float, default=7.5, help="Classifier-free guidance scale.")
    p.add_argument("--seed", type=int, default=0, help="Seed; image k of a prompt uses seed + k.")
    p.add_argument("--scheduler", default="dpm++", choices=sorted(SCHEDULERS), help="Sampler.")
    p.add_argument("--height", type=int, default=None, help="Image height (default: the model's size).")
    p.add_argument("--width", type=int, default=None, help="Image width (default: the model's size).")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cuda, mps or cpu.")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"],
                   help="auto: fp16 on cuda/mps, fp32 on cpu.")
    p.add_argument("--output", default="outputs", help="Folder for the PNGs and grid.png.")
    return p


def check(args):
    if missing_model_path(args.base):
        raise UsageError(f"--base {args.base}: no such file or folder, and not a hub id")
    if args.lora_scale and len(args.lora_scale) != len(args.lora):
        raise UsageError(f"--lora_scale given {len(args.lora_scale)} times for {len(args.lora)} --lora; give one each")
    for lora in args.lora:
        if not os.path.exists(lora):
            raise UsageError(f"--lora {lora}: no such file or folder")
        if os.path.isdir(lora) and not any(n.endswith(".safetensors") for n in os.listdir(lora)):
            raise UsageError(f"--lora {lora}: folder has no .safetensors file")
    if args.num_images < 1 or args.steps < 1:
        raise UsageError("--num_images and --steps must be >= 1")
    for flag in ("height", "width"):
        if getattr(args, flag) is not None and getattr(args, flag) % 8:
            raise UsageError(f"--{flag} must be a multiple of 8")
    if os.path.isfile(args.output):
        raise UsageError(f"--output {args.output} is a file; give a folder")


def pick_device(name):
    import torch
    if name != "auto":
        return name
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def load_lora(pipe, path, adapter_name):
    """A folder may hold our diffusers file, a kohya file, or both: prefer the diffusers one."""
    if os.path.isdir(path):
        names = sorted(n for n in os.listdir(path) if n.endswith(".safetensors"))
        weight_name = "pytorch_lora_weights.safetensors" if "pytorch_lora_weights.safetensors" in names else names[0]
        pipe.load_lora_weights(path, weight_name=weight_name, adapter_name=adapter_name)
    else:
        pipe.load_lora_weights(os.path.dirname(os.path.abspath(path)), weight_name=os.path.basename(path),
                               adapter_name=adapter_name)


def main(argv=None):
    try:
        args = build_parser().parse_args(argv)
        check(args)
    except UsageError as e:
        print(f"infer.py: error: {e}", file=sys.stderr)
        return 2

    from train_dreambooth_lora import quiet_libraries
    quiet_libraries()  # first: some notices are printed at import time
    import diffusers
    import torch
    from diffusers import StableDiffusionPipeline

    from dreambooth.validation import image_grid

    device = pick_device(args.device)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}.get(
        args.dtype, torch.float16 if device in ("cuda", "mps") else torch.float32)
    kwargs = {"torch_dtype": dtype, "safety_checker": None, "requires_safety_checker": False}
    if os.path.isfile(args.base):
        pipe = StableDiffusionPipeline.from_single_file(args.base, **kwargs)
    else:
        pipe = StableDiffusionPipeline.from_pretrained(args.base, **kwargs)
    if SCHEDULERS[args.scheduler]:
        pipe.scheduler = getattr(diffusers, SCHEDULERS[args.scheduler]).from_config(pipe.scheduler.config)
    names = []
    for i, lora in enumerate(args.lora):
        names.append(f"lora{i}")
        load_lora(pipe, lora, names[-1])
    if names:
        pipe.set_adapters(names, adapter_weights=args.lora_scale or [1.0] * len(names))
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)

    os.makedirs(args.output, exist_ok=True)
    images = []
    for p, prompt in enumerate(args.prompt):
        generators = [torch.Generator("cpu").manual_seed(args.seed + k) for k in range(args.num_images)]
        batch = pipe(prompt, negative_prompt=args.negative_prompt, num_images_per_prompt=args.num_images,
                     num_inference_steps=args.steps, guidance_scale=args.guidance_scale, generator=generators,
                     height=args.height, width=args.width).images
        for k, image in enumerate(batch):
            slug = re.sub(r"[^a-z0-9]+", "_", prompt.lower()).strip("_")[:40]
            image.save(os.path.join(args.output, f"{p:02d}-{k:02d}-{slug}.png"))
        images += batch
    image_grid(images).save(os.path.join(args.output, "grid.png"))
    print(f"wrote {len(images)} image{'s' if len(images) != 1 else ''} and grid.png to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
